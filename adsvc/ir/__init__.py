"""The in-memory IR: immutable interned nodes and graphs (see node.py, graph.py)."""
