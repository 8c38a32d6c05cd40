"""adsvc's ground floor: what every layer (compiler core, server, SDK, CLI) shares.

The generated protos (`proto/`), the typed errors, dtypes, tensor encoding, feed
conversion, the derived-name grammar (`tangent:x`, `grad2:x` ...), the one mode
normaliser, the client recipes (value_and_grad, jacobian, hessian ... as functions over
compile/evaluate) and the weighted LRU. It imports nothing from adsvc; it ships with
the SDK so that `pip install ./clients/python` works on its own.
"""
