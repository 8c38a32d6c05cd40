'use strict';
/**
 * adsvc client for Node.js: build graphs in the adsvc IR, and call an adsvc server's
 * `adsvc.v1.AutodiffService` over gRPC (`@grpc/grpc-js`, the repo's `protos/` loaded at
 * run time by `@grpc/proto-loader`; no generated code, no copy of the .proto files).
 *
 * Tensors go over the wire as raw little-endian bytes. Inputs are plain numbers,
 * (nested) arrays or typed arrays; outputs come back as numbers (scalars) or typed
 * arrays (`Float64Array` ...) carrying a `dims` property. A failed call rejects with an
 * {@link AdsvcError} subclass named like the Python SDK's (class from the
 * `google.rpc.ErrorInfo` reason of the status details, `field` and `description` from
 * its `google.rpc.BadRequest` field violation).
 *
 * @module adsvc
 */

const fs = require('fs');
const os = require('os');
const path = require('path');
const crypto = require('crypto');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

/**
 * Directory of the adsvc `.proto` files: `$ADSVC_PROTOS_DIR`, else the repo's `protos/`
 * two levels above this file.
 * @type {string}
 */
const PROTOS_DIR = process.env.ADSVC_PROTOS_DIR || path.resolve(__dirname, '..', '..', 'protos');
const GOOGLE_PROTOS_DIR = path.dirname(require.resolve('google-proto-files/package.json'));

/** IR and opset versions this client writes. @type {{ir: number, opset: number}} */
const VERSIONS = Object.freeze({ ir: 1, opset: 1 });

const LOADER_OPTIONS = {
  keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true,
};

function loadProtocol() {
  const service = path.join(PROTOS_DIR, 'adsvc', 'v1', 'service.proto');
  if (!fs.existsSync(service)) {
    throw new Error(`adsvc: cannot find ${service}; set ADSVC_PROTOS_DIR to the repo's protos/`);
  }
  const definition = protoLoader.loadSync('adsvc/v1/service.proto', {
    ...LOADER_OPTIONS, includeDirs: [PROTOS_DIR],
  });
  const { AutodiffService } = grpc.loadPackageDefinition(definition).adsvc.v1;
  // protobufjs types for what proto-loader does not expose: decoding the rich status
  // details (google.rpc.*, shipped by google-proto-files) and protobuf-JSON graphs.
  const root = new protobuf.Root();
  root.resolvePath = (origin, target) => {
    for (const dir of [PROTOS_DIR, GOOGLE_PROTOS_DIR]) {
      const candidate = path.join(dir, target);
      if (fs.existsSync(candidate)) return candidate;
    }
    return protobuf.util.path.resolve(origin, target);
  };
  root.loadSync(['adsvc/v1/service.proto', 'google/rpc/status.proto',
    'google/rpc/error_details.proto'], { keepCase: true });
  return { AutodiffService, root };
}

const PROTOCOL = loadProtocol();

// ---------------------------------------------------------------------------------------
// dtypes and tensors

const DTYPES = {
  float64: { wire: 'DTYPE_FLOAT64', size: 8, Array: Float64Array },
  float32: { wire: 'DTYPE_FLOAT32', size: 4, Array: Float32Array },
  int64: { wire: 'DTYPE_INT64', size: 8, Array: BigInt64Array },
  int32: { wire: 'DTYPE_INT32', size: 4, Array: Int32Array },
  bool: { wire: 'DTYPE_BOOL', size: 1, Array: Uint8Array },
};
const WIRE_TO_DTYPE = Object.fromEntries(Object.entries(DTYPES).map(([k, v]) => [v.wire, k]));
const ENUM_NUMBERS = ['DTYPE_UNSPECIFIED', 'DTYPE_FLOAT64', 'DTYPE_FLOAT32', 'DTYPE_INT64',
  'DTYPE_INT32', 'DTYPE_BOOL'];
const LITTLE_ENDIAN = os.endianness() === 'LE';

/**
 * The canonical dtype name ("float64", "float32", "int64", "int32", "bool") of a name,
 * a wire enum name ("DTYPE_FLOAT32") or an enum number; throws TypeError otherwise.
 * @param {string|number} dtype
 * @returns {string}
 */
function dtypeName(dtype) {
  let name = typeof dtype === 'number' ? ENUM_NUMBERS[dtype] : dtype;
  if (typeof name === 'string' && WIRE_TO_DTYPE[name]) name = WIRE_TO_DTYPE[name];
  if (name === 'boolean') name = 'bool';
  if (typeof name !== 'string' || !DTYPES[name]) {
    throw new TypeError(`unknown dtype ${JSON.stringify(dtype)}; one of ${Object.keys(DTYPES).join(', ')}`);
  }
  return name;
}

function dtypeOfTypedArray(a) {
  if (a instanceof Float32Array) return 'float32';
  if (a instanceof BigInt64Array) return 'int64';
  if (a instanceof Int32Array) return 'int32';
  return 'float64';
}

/**
 * A tensor value with an explicit shape (and optionally dtype), for inputs whose shape
 * cannot be read off the value: `tensor(new Float64Array(6), [2, 3])`.
 * @param {number|boolean|bigint|Array|ArrayLike<number>} data row-major elements (or nested arrays)
 * @param {number[]} [dims] the shape; default: inferred from nesting
 * @param {string} [dtype] e.g. "float32"; default: the declared type of the input it feeds
 * @returns {{data: *, dims: number[]|undefined, dtype: string|undefined}}
 */
function tensor(data, dims, dtype) {
  return { data, dims: dims === undefined ? undefined : dims.map(Number), dtype };
}

function isTypedArray(v) {
  return ArrayBuffer.isView(v) && !(v instanceof DataView);
}

function isTensorSpec(v) {
  return v !== null && typeof v === 'object' && !Array.isArray(v) && !isTypedArray(v) && 'data' in v;
}

/** Flatten nested arrays row-major, checking they are rectangular. */
function flatten(value, field) {
  if (!Array.isArray(value)) return { flat: [value], dims: [] };
  const dims = [];
  for (let v = value; Array.isArray(v); v = v[0]) dims.push(v.length);
  const flat = [];
  const walk = (v, depth) => {
    if (depth === dims.length) {
      if (Array.isArray(v)) throw new InputError(`ragged nested arrays`, { field });
      flat.push(v);
      return;
    }
    if (!Array.isArray(v) || v.length !== dims[depth]) {
      throw new InputError(`ragged nested arrays (not every row has ${dims[depth]} elements)`, { field });
    }
    for (const x of v) walk(x, depth + 1);
  };
  walk(value, 0);
  return { flat, dims };
}

function convertElement(x, dtype, field) {
  if (dtype === 'float64' || dtype === 'float32') {
    if (typeof x === 'number') return x;
    if (typeof x === 'bigint' || typeof x === 'boolean') return Number(x);
  } else if (dtype === 'bool') {
    if (x === true || x === false) return x ? 1 : 0;
    if (x === 0 || x === 1 || x === 0n || x === 1n) return Number(x);
  } else if (typeof x === 'bigint' || (typeof x === 'number' && Number.isInteger(x))) {
    const big = BigInt(x);
    const limit = dtype === 'int64' ? 2n ** 63n : 2n ** 31n;
    if (big >= -limit && big < limit) return dtype === 'int64' ? big : Number(big);
  } else if (typeof x === 'boolean') {
    return dtype === 'int64' ? BigInt(x) : Number(x);
  }
  throw new InputError(`${typeof x === 'object' ? JSON.stringify(x) : String(x)} is not an exact ${dtype} value`, { field });
}

/**
 * Encode a value as an `adsvc.v1.Tensor` message (raw little-endian bytes).
 *
 * Accepts a number, boolean or bigint (a scalar), nested arrays (shape from nesting),
 * a typed array (1-D, or the shape in its `dims` property, as outputs carry), or a
 * {@link tensor} spec. Values are converted to `dtype` (exactly, for integer and bool
 * types); throws {@link InputError} naming `field` when they cannot be.
 * @param {*} value
 * @param {string} [dtype] default: the spec's dtype, the typed array's, or float64
 * @param {string} [field] where the value goes, for error messages (e.g. "inputs.x")
 * @returns {{dtype: string, dims: number[], raw: Buffer}}
 */
function encodeTensor(value, dtype, field = 'tensor') {
  let dims;
  let data = value;
  let specDtype;
  if (isTensorSpec(value)) {
    ({ data, dims } = value);
    specDtype = value.dtype;
  }
  if (isTypedArray(data) && specDtype === undefined && dtype === undefined) specDtype = dtypeOfTypedArray(data);
  const name = dtypeName(dtype ?? specDtype ?? 'float64');
  let flat;
  if (isTypedArray(data)) {
    flat = data;
    dims = dims ?? (Array.isArray(data.dims) ? data.dims.slice() : [data.length]);
  } else {
    const f = flatten(data, field);
    flat = f.flat;
    dims = dims ?? f.dims;
  }
  const count = dims.reduce((a, b) => a * b, 1);
  if (count !== flat.length) {
    throw new InputError(`${flat.length} elements do not fill shape [${dims.join(', ')}]`, { field });
  }
  const { Array: TA, wire } = DTYPES[name];
  const out = new TA(count);
  for (let i = 0; i < count; i++) out[i] = convertElement(flat[i], name, field);
  return { dtype: wire, dims: dims.slice(), raw: toLittleEndian(out) };
}

function toLittleEndian(typed) {
  if (LITTLE_ENDIAN || typed.BYTES_PER_ELEMENT === 1) {
    return Buffer.from(typed.buffer, typed.byteOffset, typed.byteLength);
  }
  const buf = Buffer.alloc(typed.byteLength);
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const put = { 8: typed instanceof BigInt64Array ? 'setBigInt64' : 'setFloat64', 4: typed instanceof Int32Array ? 'setInt32' : 'setFloat32' }[typed.BYTES_PER_ELEMENT];
  typed.forEach((x, i) => view[put](i * typed.BYTES_PER_ELEMENT, x, true));
  return buf;
}

function fromLittleEndian(raw, TA) {
  const n = raw.length / TA.BYTES_PER_ELEMENT;
  const out = new TA(n);
  if (LITTLE_ENDIAN || TA.BYTES_PER_ELEMENT === 1) {
    // copy into the array's own (aligned) buffer: `raw` may sit at any offset
    new Uint8Array(out.buffer).set(raw);
    return out;
  }
  const view = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
  const get = { 8: TA === BigInt64Array ? 'getBigInt64' : 'getFloat64', 4: TA === Int32Array ? 'getInt32' : 'getFloat32' }[TA.BYTES_PER_ELEMENT];
  for (let i = 0; i < n; i++) out[i] = view[get](i * TA.BYTES_PER_ELEMENT, true);
  return out;
}

/**
 * Decode an `adsvc.v1.Tensor` message (from `raw` bytes, or from `values`).
 *
 * A scalar (empty dims) becomes a number (a boolean for bool; int64 a number when it
 * is a safe integer, else a bigint). Anything else becomes a typed array of the dtype
 * (`Float64Array`, `Float32Array`, `BigInt64Array`, `Int32Array`, `Uint8Array` for
 * bool) with non-enumerable `dims` and `dtype` properties; see {@link toNested}.
 * @param {{dtype: string|number, dims: number[], raw?: Buffer, values?: number[]}} t
 * @param {string} [field] for error messages
 * @returns {number|boolean|bigint|Float64Array|Float32Array|BigInt64Array|Int32Array|Uint8Array}
 */
function decodeTensor(t, field = 'tensor') {
  const dtype = dtypeName(t.dtype);
  const { Array: TA, size } = DTYPES[dtype];
  const dims = (t.dims || []).map(Number);
  const count = dims.reduce((a, b) => a * b, 1);
  let data;
  if (t.values && t.values.length) {
    data = dtype === 'int64' ? BigInt64Array.from(t.values, (v) => BigInt(v)) : TA.from(t.values);
  } else {
    const raw = t.raw || Buffer.alloc(0);
    if (raw.length !== count * size) {
      throw new AdsvcError(`${raw.length} raw bytes for a ${dtype} tensor of shape [${dims.join(', ')}]`, { field });
    }
    data = fromLittleEndian(raw, TA);
  }
  if (data.length !== count) {
    throw new AdsvcError(`${data.length} values for shape [${dims.join(', ')}]`, { field });
  }
  if (dims.length === 0) {
    const x = data[0];
    if (dtype === 'bool') return x !== 0;
    if (dtype === 'int64') return x >= BigInt(Number.MIN_SAFE_INTEGER) && x <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(x) : x;
    return x;
  }
  Object.defineProperty(data, 'dims', { value: dims, enumerable: false });
  Object.defineProperty(data, 'dtype', { value: dtype, enumerable: false });
  return data;
}

/**
 * A decoded tensor as nested JavaScript arrays (row-major); a scalar is returned as is.
 * @param {*} value a decoded output (typed array with `dims`) or a number
 * @returns {*}
 */
function toNested(value) {
  if (!isTypedArray(value)) return value;
  const dims = value.dims || [value.length];
  const flat = value.dtype === 'bool' ? Array.from(value, (x) => x !== 0) : Array.from(value);
  if (dims.length === 0) return flat[0];
  const build = (axis, offset) => {
    if (axis === dims.length - 1) return flat.slice(offset, offset + dims[axis]);
    const stride = dims.slice(axis + 1).reduce((a, b) => a * b, 1);
    return Array.from({ length: dims[axis] }, (_, i) => build(axis + 1, offset + i * stride));
  };
  return build(0, 0);
}

// ---------------------------------------------------------------------------------------
// graphs

const BOOL_RESULT = new Set(['eq', 'ne', 'lt', 'le', 'gt', 'ge']);

function deepFreeze(o) {
  if (o !== null && typeof o === 'object' && !Object.isFrozen(o) && !ArrayBuffer.isView(o)) {
    Object.values(o).forEach(deepFreeze);
    Object.freeze(o);
  }
  return o;
}

/**
 * An `adsvc.v1.AttrValue` for a JavaScript value: an integer → `i`, another number →
 * `f`, a boolean → `b`, an array → `ints`, a dtype name for the key "dtype" → `dtype`,
 * another string → `s`. An object that already is an AttrValue (`{i: 2}`, `{f: 2}`,
 * `{ints: {values: [0]}}` ...) is passed through.
 * @param {string} key the attribute name
 * @param {*} value
 * @returns {object}
 */
function attrValue(key, value) {
  if (value !== null && typeof value === 'object' && !Array.isArray(value)) {
    const kinds = ['i', 'f', 's', 'b', 'ints', 'dtype'].filter((k) => k in value);
    if (kinds.length === 1) return kinds[0] === 'dtype' ? { dtype: DTYPES[dtypeName(value.dtype)].wire } : value;
    throw new TypeError(`attribute ${key}: not an AttrValue: ${JSON.stringify(value)}`);
  }
  if (typeof value === 'boolean') return { b: value };
  if (typeof value === 'number' || typeof value === 'bigint') {
    return Number.isInteger(Number(value)) ? { i: Number(value) } : { f: value };
  }
  if (Array.isArray(value)) return { ints: { values: value.map(Number) } };
  if (typeof value === 'string') return key === 'dtype' ? { dtype: DTYPES[dtypeName(value)].wire } : { s: value };
  throw new TypeError(`attribute ${key}: cannot encode ${String(value)}`);
}

/**
 * A value in a graph under construction (an input or a node's result), as returned by
 * the {@link GraphBuilder} methods and accepted as their operands.
 */
class Value {
  /**
   * @param {GraphBuilder} builder the builder it belongs to
   * @param {number} id its id in the graph
   * @param {string|undefined} dtype its dtype, where the builder can tell
   */
  constructor(builder, id, dtype) {
    this.builder = builder;
    this.id = id;
    this.dtype = dtype;
    Object.freeze(this);
  }
}

/**
 * Builds an `adsvc.v1.Graph` (SSA: inputs, then nodes in topological order, then named
 * outputs; ids assigned in order).
 *
 * ```js
 * const g = new GraphBuilder();
 * const x = g.input('x'), y = g.input('y');
 * g.output('z', g.add(g.add(g.mul(x, x), g.mul(x, y)), 2));
 * const graph = g.build();
 * ```
 *
 * Operands are {@link Value}s of this builder, or numbers / nested arrays / typed arrays,
 * which become constants of the dtype of the op's other operand (float64 if unknown).
 * Every op of the opset is reachable with {@link GraphBuilder#op}; common ones have
 * methods. The server validates the graph (shapes, dtypes, attributes).
 */
class GraphBuilder {
  /** @param {string} [name] the graph's name (for humans) */
  constructor(name = '') {
    this.name = name;
    this.inputs = [];
    this.nodes = [];
    this.outputs = [];
    this.nextId = 0;
  }

  /**
   * Declare an input fed at evaluation time.
   * @param {string} name
   * @param {string} [dtype] "float64" (default), "float32", "int64", "int32", "bool"
   * @param {number[]} [dims] static shape; [] (default) is a scalar
   * @returns {Value}
   */
  input(name, dtype = 'float64', dims = []) {
    const d = dtypeName(dtype);
    const id = this.nextId++;
    this.inputs.push({ id, name, type: { dtype: DTYPES[d].wire, dims: dims.map(Number) } });
    return new Value(this, id, d);
  }

  /**
   * A constant tensor node.
   * @param {*} values a number, nested arrays or a typed array (row-major)
   * @param {number[]} [dims] shape; default: from nesting (a typed array: 1-D)
   * @param {string} [dtype] default "float64"
   * @returns {Value}
   */
  constant(values, dims, dtype = 'float64') {
    const d = dtypeName(dtype);
    const id = this.nextId++;
    const value = encodeTensor(dims === undefined ? values : tensor(values, dims), d, `nodes[id=${id}]`);
    this.nodes.push({ id, op: 'constant', operands: [], attrs: {}, value });
    return new Value(this, id, d);
  }

  /**
   * A node applying op `name` to `operands`, with attributes (see {@link attrValue}).
   * @param {string} name op name from the op table, e.g. "add", "sum", "matmul"
   * @param {Array<Value|number|Array>} operands
   * @param {Object<string, *>} [attrs] e.g. `{axes: [0], keepdims: true}`
   * @param {{label?: string}} [options]
   * @returns {Value}
   */
  op(name, operands = [], attrs = {}, { label } = {}) {
    const peer = operands.find((o, i) => o instanceof Value && o.dtype !== undefined
      && !(name === 'where' && i === 0));
    const ids = operands.map((o, i) => {
      if (o instanceof Value) {
        if (o.builder !== this) throw new TypeError(`${name}: operand ${i} belongs to another GraphBuilder`);
        return o.id;
      }
      if (name === 'take' && i === 1) return this.constant(o, undefined, 'int64').id;
      if (name === 'where' && i === 0) return this.constant(o, undefined, 'bool').id;
      return this.constant(o, undefined, peer && peer.dtype !== 'bool' ? peer.dtype : 'float64').id;
    });
    const encoded = {};
    for (const [k, v] of Object.entries(attrs)) {
      if (v !== undefined) encoded[k] = attrValue(k, v);
    }
    const id = this.nextId++;
    const node = { id, op: name, operands: ids, attrs: encoded };
    if (label) node.label = label;
    this.nodes.push(node);
    let dtype;
    if (BOOL_RESULT.has(name)) dtype = 'bool';
    else if (name === 'cast' && attrs.dtype !== undefined) dtype = dtypeName(attrs.dtype.dtype ?? attrs.dtype);
    else dtype = peer ? peer.dtype : undefined;
    return new Value(this, id, dtype);
  }

  /**
   * Name a value as a graph output.
   * @param {string} name
   * @param {Value} value
   * @returns {GraphBuilder} this
   */
  output(name, value) {
    if (!(value instanceof Value) || value.builder !== this) throw new TypeError(`output ${name}: not a Value of this builder`);
    this.outputs.push({ name, id: value.id });
    return this;
  }

  /**
   * The graph as an `adsvc.v1.Graph` message object (ir_version and opset_version 1),
   * deeply frozen (so clients may cache what they compiled for it).
   * @returns {object}
   */
  build() {
    return deepFreeze(structuredClone({
      ir_version: VERSIONS.ir, opset_version: VERSIONS.opset, name: this.name,
      inputs: this.inputs, nodes: this.nodes, outputs: this.outputs,
    }));
  }
}

const UNARY = ['neg', 'abs', 'sign', 'exp', 'expm1', 'log', 'log1p', 'sin', 'cos', 'tan', 'tanh',
  'sigmoid', 'softplus', 'sqrt', 'square', 'reciprocal'];
const BINARY = ['add', 'sub', 'mul', 'div', 'pow', 'maximum', 'minimum', 'matmul', 'eq', 'ne',
  'lt', 'le', 'gt', 'ge'];
const REDUCE = ['sum', 'mean', 'max', 'min', 'logsumexp'];
for (const name of UNARY) {
  Object.defineProperty(GraphBuilder.prototype, name, {
    value: { [name](x) { return this.op(name, [x]); } }[name], writable: true, configurable: true,
  });
}
for (const name of BINARY) {
  Object.defineProperty(GraphBuilder.prototype, name, {
    value: { [name](a, b) { return this.op(name, [a, b]); } }[name], writable: true, configurable: true,
  });
}
for (const name of REDUCE) {
  Object.defineProperty(GraphBuilder.prototype, name, {
    value: { [name](x, { axes, keepdims } = {}) { return this.op(name, [x], { axes, keepdims }); } }[name],
    writable: true,
    configurable: true,
  });
}
/**
 * @name GraphBuilder#neg
 * @function
 * @description Elementwise ops of one operand, one method each: neg, abs, sign, exp,
 * expm1, log, log1p, sin, cos, tan, tanh, sigmoid, softplus, sqrt, square, reciprocal.
 * @param {Value|number} x
 * @returns {Value}
 */
/**
 * @name GraphBuilder#add
 * @function
 * @description Ops of two operands, one method each: add, sub, mul, div, pow, maximum,
 * minimum, matmul, and the comparisons eq, ne, lt, le, gt, ge (bool results).
 * @param {Value|number} a
 * @param {Value|number} b
 * @returns {Value}
 */
/**
 * @name GraphBuilder#sum
 * @function
 * @description Reductions, one method each: sum, mean, max, min, logsumexp.
 * @param {Value} x
 * @param {{axes?: number[], keepdims?: boolean}} [options] axes absent: all axes
 * @returns {Value}
 */
Object.assign(GraphBuilder.prototype, {
  /**
   * `where(cond, a, b)`: a where cond else b (broadcast).
   * @param {Value} cond @param {Value|number} a @param {Value|number} b
   * @returns {Value}
   */
  where(cond, a, b) { return this.op('where', [cond, a, b]); },
  /**
   * Convert to another dtype. @param {Value} x @param {string} dtype @returns {Value}
   */
  cast(x, dtype) { return this.op('cast', [x], { dtype }); },
  /** Row-major reshape. @param {Value} x @param {number[]} shape @returns {Value} */
  reshape(x, shape) { return this.op('reshape', [x], { shape }); },
  /** Permute axes. @param {Value} x @param {number[]} perm @returns {Value} */
  transpose(x, perm) { return this.op('transpose', [x], { perm }); },
  /** Broadcast to a shape. @param {Value} x @param {number[]} shape @returns {Value} */
  broadcastTo(x, shape) { return this.op('broadcast_to', [x], { shape }); },
  /** Join along an axis. @param {Value[]} xs @param {number} [axis] @returns {Value} */
  concat(xs, axis = 0) { return this.op('concat', xs, { axis }); },
  /**
   * Strided slice on every axis.
   * @param {Value} x @param {number[]} starts @param {number[]} stops @param {number[]} [steps]
   * @returns {Value}
   */
  slice(x, starts, stops, steps) { return this.op('slice', [x], { starts, stops, steps }); },
  /**
   * Gather along an axis. @param {Value} x @param {Value|number[]} indices (int64 constant
   * when given as numbers) @param {number} [axis] @returns {Value}
   */
  take(x, indices, axis = 0) { return this.op('take', [x, indices], { axis }); },
  /** Identity with a zero derivative. @param {Value} x @returns {Value} */
  stopGradient(x) { return this.op('stop_gradient', [x]); },
});

/** The adsvc.v1.Graph protobufjs type, for JSON conversion. */
function graphType() {
  return PROTOCOL.root.lookupType('adsvc.v1.Graph');
}

/**
 * An `adsvc.v1.Graph` from protobuf JSON (what `adsvc export -o graph.json` writes and
 * protos/README.md shows: lowerCamelCase or snake_case field names, enum names,
 * base64 `raw` bytes or `values`). Deeply frozen, like {@link GraphBuilder#build}.
 * @param {string|object} json the JSON text or the parsed object
 * @returns {object}
 */
function graphFromJSON(json) {
  const obj = typeof json === 'string' ? JSON.parse(json) : json;
  const type = graphType();
  const message = type.fromObject(snakeCase(type, obj));
  const err = type.verify(message);
  if (err) throw new InvalidGraphError(`not a Graph: ${err}`);
  return deepFreeze(type.toObject(message, { enums: String, longs: Number, defaults: false }));
}

/** Rename protobuf-JSON (lowerCamelCase) keys to the proto field names, guided by the type. */
function snakeCase(type, obj) {
  if (obj === null || typeof obj !== 'object' || Array.isArray(obj)) return obj;
  const byJsonName = {};
  for (const f of type.fieldsArray) {
    byJsonName[f.name] = f;
    byJsonName[protobuf.util.camelCase(f.name)] = f;
  }
  const out = {};
  for (const [key, v] of Object.entries(obj)) {
    const f = byJsonName[key];
    if (!f) throw new InvalidGraphError(`unknown field ${JSON.stringify(key)} in ${type.name}`);
    f.resolve();
    const sub = f.resolvedType instanceof protobuf.Type ? f.resolvedType : null;
    const conv = (x) => (sub ? snakeCase(sub, x) : x);
    if (f.map) out[f.name] = Object.fromEntries(Object.entries(v).map(([k, x]) => [k, conv(x)]));
    else if (f.repeated && Array.isArray(v)) out[f.name] = v.map(conv);
    else out[f.name] = conv(v);
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// errors

/**
 * Base class of every error a client call rejects with. `field` locates the problem
 * (`nodes[id=7]`, `inputs.x`), `description` says what it is; `code` / `codeName` are
 * the gRPC status; `reason` the ErrorInfo reason the server sent (the Python class
 * name; it may name a class this client does not know), `context` the nearby nodes,
 * `requestId` the call's x-request-id (find it in the server log).
 */
class AdsvcError extends Error {
  /**
   * @param {string} description what is wrong
   * @param {{field?: string, context?: string, code?: number, codeName?: string,
   *   reason?: string, requestId?: string, cause?: Error}} [details]
   */
  constructor(description, { field = '', context = '', code, codeName, reason = '', requestId = '', cause } = {}) {
    super(field ? `${field}: ${description}` : description, cause ? { cause } : undefined);
    this.name = new.target.name;
    this.description = description;
    this.field = field;
    this.context = context;
    this.code = code ?? grpc.status[new.target.grpcCode];
    this.codeName = codeName ?? new.target.grpcCode;
    this.reason = reason;
    this.requestId = requestId;
  }
}
AdsvcError.grpcCode = 'INTERNAL';

/**
 * Every error class by name (the ErrorInfo `reason` the server sends, e.g.
 * "ShapeError"); filled in below.
 * @type {Object<string, typeof AdsvcError>}
 */
const ERROR_CLASSES = { AdsvcError };

function defineError(name, parent, grpcCode, doc) {
  const cls = { [name]: class extends parent {} }[name];
  if (grpcCode) cls.grpcCode = grpcCode;
  cls.doc = doc;
  ERROR_CLASSES[name] = cls;
  return cls;
}

/** The graph is malformed (INVALID_ARGUMENT). */
const InvalidGraphError = defineError('InvalidGraphError', AdsvcError, 'INVALID_ARGUMENT', 'The graph is malformed.');
/** IR or opset version the server does not know. */
const VersionError = defineError('VersionError', InvalidGraphError, null, 'IR or opset version the server does not know.');
/** A node names an op that is not in the op table. */
const UnknownOpError = defineError('UnknownOpError', InvalidGraphError, null, 'A node names an op that is not in the op table.');
/** A node has the wrong number of operands. */
const ArityError = defineError('ArityError', InvalidGraphError, null, 'A node has the wrong number of operands.');
/** A node attribute is missing, unknown, of the wrong kind or out of range (reason "AttributeError_", as in Python). */
const AttributeError_ = defineError('AttributeError_', InvalidGraphError, null, 'A node attribute is missing, unknown, of the wrong kind or out of range.');
/** An operand or output refers to an id that is not defined in the graph. */
const UndefinedReferenceError = defineError('UndefinedReferenceError', InvalidGraphError, null, 'An operand or output refers to an undefined id.');
/** An operand refers to a node listed later (nodes must be in topological order). */
const ForwardReferenceError = defineError('ForwardReferenceError', InvalidGraphError, null, 'An operand refers to a node listed later.');
/** Two inputs/nodes share an id, or two inputs/outputs share a name. */
const DuplicateIdError = defineError('DuplicateIdError', InvalidGraphError, null, 'Duplicate id or name.');
/** The operand references form a cycle; `cycle` lists the node ids on it. */
const CycleError = defineError('CycleError', InvalidGraphError, null, 'The operand references form a cycle.');
/** Operand shapes are incompatible with the op. */
const ShapeError = defineError('ShapeError', InvalidGraphError, null, 'Operand shapes are incompatible with the op.');
/** Operand dtypes are incompatible with the op. */
const DTypeError = defineError('DTypeError', InvalidGraphError, null, 'Operand dtypes are incompatible with the op.');
/** A derivative was requested through an integer or boolean value. */
const NotDifferentiableError = defineError('NotDifferentiableError', InvalidGraphError, null, 'A derivative was requested through an integer or boolean value.');
/** The request is malformed apart from the graph (bad mode, wrt name, order ...). */
const InvalidRequestError = defineError('InvalidRequestError', AdsvcError, 'INVALID_ARGUMENT', 'The request is malformed apart from the graph.');
/** A fed input is missing, unknown, or has the wrong dtype or shape. */
const InputError = defineError('InputError', AdsvcError, 'INVALID_ARGUMENT', 'A fed input is missing, unknown, or has the wrong dtype or shape.');
/** A kernel failed while evaluating a well-formed graph (e.g. index out of range). */
const EvaluationError = defineError('EvaluationError', AdsvcError, 'INVALID_ARGUMENT', 'A kernel failed while evaluating a well-formed graph.');
/** A limit (nodes, tensor elements, message size, order, concurrent calls) was exceeded (RESOURCE_EXHAUSTED). */
const LimitExceededError = defineError('LimitExceededError', AdsvcError, 'RESOURCE_EXHAUSTED', 'A configured limit was exceeded.');
/** The compiled-graph handle is not (or no longer) held by the server (NOT_FOUND). */
const HandleNotFoundError = defineError('HandleNotFoundError', AdsvcError, 'NOT_FOUND', 'The compiled-graph handle is not cached on the server.');
/** A token is required and was missing or wrong (UNAUTHENTICATED). */
const UnauthenticatedError = defineError('UnauthenticatedError', AdsvcError, 'UNAUTHENTICATED', 'A token is required and was missing or wrong.');
/** The call's deadline expired; the server stopped the work (DEADLINE_EXCEEDED). */
const DeadlineExceededError = defineError('DeadlineExceededError', AdsvcError, 'DEADLINE_EXCEEDED', "The call's deadline expired.");
/** The server could not be reached, after retries (UNAVAILABLE). */
const UnavailableError = defineError('UnavailableError', AdsvcError, 'UNAVAILABLE', 'The server could not be reached.');
/** The call was cancelled (CANCELLED). */
const CancelledError = defineError('CancelledError', AdsvcError, 'CANCELLED', 'The call was cancelled.');
/** A usage error (as the Python CLI's): bad arguments to a call. */
const UsageError = defineError('UsageError', AdsvcError, 'INVALID_ARGUMENT', 'Bad arguments.');

// The class of a status that carries no ErrorInfo reason (raised by gRPC itself or a proxy).
const CLASS_FOR_CODE = Object.fromEntries([InvalidRequestError, LimitExceededError,
  HandleNotFoundError, UnauthenticatedError, DeadlineExceededError, UnavailableError,
  CancelledError].map((cls) => [grpc.status[cls.grpcCode], cls]));

/**
 * The rich error details of a failed gRPC call: `google.rpc.Status` decoded from the
 * `grpc-status-details-bin` trailing metadata, with its BadRequest and ErrorInfo.
 * @param {object} err a grpc-js ServiceError (with `metadata`)
 * @returns {{status: object|null, field: string, description: string, reason: string,
 *   domain: string, metadata: Object<string,string>}}
 */
function statusDetails(err) {
  const out = { status: null, field: '', description: '', reason: '', domain: '', metadata: {} };
  const bins = err && err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  if (!bins.length) return out;
  const { root } = PROTOCOL;
  try {
    out.status = root.lookupType('google.rpc.Status').decode(bins[0]);
  } catch {
    return out; // malformed details: map by the code alone
  }
  for (const any of out.status.details) {
    const typeName = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    if (typeName === 'google.rpc.BadRequest') {
      const br = root.lookupType(typeName).decode(any.value);
      if (br.field_violations.length && !out.field && !out.description) {
        out.field = br.field_violations[0].field;
        out.description = br.field_violations[0].description;
      }
    } else if (typeName === 'google.rpc.ErrorInfo') {
      const info = root.lookupType(typeName).decode(any.value);
      out.reason = info.reason;
      out.domain = info.domain;
      out.metadata = { ...info.metadata };
    }
  }
  return out;
}

/**
 * The typed error for a failed grpc-js call: the class named by the ErrorInfo reason
 * (else by the status code), field and description from the BadRequest violation.
 * @param {object} err a grpc-js ServiceError
 * @param {string} [requestId] the x-request-id the call was sent with
 * @returns {AdsvcError}
 */
function errorFromGrpc(err, requestId = '') {
  if (err instanceof AdsvcError) return err;
  const d = statusDetails(err);
  const code = typeof err.code === 'number' ? err.code : grpc.status.UNKNOWN;
  const codeName = Object.keys(grpc.status).find((k) => grpc.status[k] === code) || 'UNKNOWN';
  const cls = ERROR_CLASSES[d.reason] || CLASS_FOR_CODE[code] || AdsvcError;
  const message = err.details || err.message || String(err);
  const description = d.description || (cls === AdsvcError ? `${codeName}: ${message}` : message);
  const returned = err.metadata ? err.metadata.get('x-request-id')[0] : undefined;
  const e = new cls(description, {
    field: d.field, context: d.metadata.context || '', code, codeName, reason: d.reason,
    requestId: returned ? String(returned) : requestId, cause: err,
  });
  if (cls === CycleError) e.cycle = d.metadata.cycle ? d.metadata.cycle.split(',').map(Number) : [];
  return e;
}

// ---------------------------------------------------------------------------------------
// the client

const MODES = { forward: 'MODE_FORWARD', reverse: 'MODE_REVERSE' };

function modeEnum(mode) {
  const m = MODES[String(mode).toLowerCase()] || (Object.values(MODES).includes(mode) ? mode : null);
  if (!m) throw new UsageError(`mode must be "forward" or "reverse", not ${JSON.stringify(mode)}`, { field: 'mode' });
  return m;
}

/**
 * An `adsvc.v1.Differentiation` message from options.
 * @param {{mode?: string, modes?: string[], order?: number, wrt?: string[], seed?: boolean}} [options]
 *   `mode`/`modes`: "forward" | "reverse", one per pass (a single mode with `order` > 1
 *   repeats); `wrt`: input names (default all float inputs); `seed`: seed a first
 *   reverse pass with 1 (a plain gradient: outputs `grad:x`)
 * @returns {object}
 */
function differentiation({ mode, modes, order = 0, wrt = [], seed = false } = {}) {
  let list = modes ?? (mode === undefined ? [] : [mode]);
  if (!Array.isArray(list)) list = [list];
  return { modes: list.map(modeEnum), order, wrt: [...wrt], seed };
}

function typeOf(t) {
  return { dtype: dtypeName(t.dtype), dims: (t.dims || []).map(Number) };
}

/** Declared input types of a graph message, plus the derived `tangent...:x` names. */
function graphSignature(graph) {
  const sig = {};
  for (const i of graph.inputs || []) sig[i.name] = typeOf(i.type || { dtype: 'DTYPE_FLOAT64' });
  return sig;
}

function signatureType(sig, name) {
  if (sig[name]) return sig[name];
  const m = /^tangent\d*:(.*)$/.exec(name); // a tangent has its input's type
  return m ? signatureType(sig, m[1]) : undefined;
}

function encodeFeeds(inputs, sig = {}) {
  if (inputs === null || typeof inputs !== 'object' || Array.isArray(inputs)) {
    throw new UsageError('inputs must be an object mapping input names to values', { field: 'inputs' });
  }
  const out = {};
  for (const [name, value] of Object.entries(inputs)) {
    const t = signatureType(sig, name);
    out[name] = encodeTensor(value, t && !(isTensorSpec(value) && value.dtype) ? t.dtype : undefined, `inputs.${name}`);
  }
  return out;
}

function decodeMap(tensors, prefix) {
  const out = {};
  for (const [name, t] of Object.entries(tensors || {})) out[name] = decodeTensor(t, `${prefix}.${name}`);
  return out;
}

function zeros(t) {
  const n = t.dims.reduce((a, b) => a * b, 1);
  return tensor(new DTYPES[t.dtype].Array(n), t.dims, t.dtype);
}

function isGraph(g) {
  return g !== null && typeof g === 'object' && Array.isArray(g.nodes);
}

/**
 * The graph as the message object grpc-js encodes: a protobuf-JSON graph (lowerCamelCase
 * fields such as `irVersion`, which the encoder would silently drop) goes through
 * {@link graphFromJSON}; anything else is passed as is.
 */
function asGraph(graph) {
  if (graph === null || typeof graph !== 'object') {
    throw new UsageError('graph must be an adsvc.v1.Graph object', { field: 'graph' });
  }
  return 'irVersion' in graph || 'opsetVersion' in graph ? graphFromJSON(graph) : graph;
}

/**
 * A graph compiled on the server (the result of {@link Client#differentiate}): evaluate
 * it by `handle` with {@link Client#evaluate}; the client re-sends `source` when a
 * server does not hold the handle.
 */
class Compiled {
  /**
   * @param {object} response the DifferentiateResponse
   * @param {object} source the graph that was compiled
   * @param {object} diff the Differentiation it was compiled with
   */
  constructor(response, source, diff) {
    /** Content-hash handle (lowercase hex sha256). @type {string} */
    this.handle = response.handle;
    /** The compiled graph (null when requested with `omitGraph`). @type {object|null} */
    this.graph = response.graph && response.graph.nodes && response.graph.nodes.length ? response.graph : null;
    /** Compile statistics (nodes_before, nodes_after, cache_hit, compile_seconds). */
    this.stats = response.stats;
    /** What Evaluate must be fed: {name: {dtype, dims}}, in graph order. */
    this.inputs = Object.fromEntries(response.inputs.map((n) => [n.name, typeOf(n.type)]));
    /** The compiled graph's outputs: {name: {dtype, dims}}. */
    this.outputs = Object.fromEntries(response.outputs.map((n) => [n.name, typeOf(n.type)]));
    /** The graph that was compiled and how, to re-send on a handle miss. */
    this.source = source;
    this.differentiation = diff;
  }
}

const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

/**
 * A client of an adsvc server.
 *
 * ```js
 * const client = new Client('127.0.0.1:50051', { timeoutMs: 10000 });
 * const { value, gradients } = await client.grad(graph, { x: 3, y: 4 });
 * client.close();
 * ```
 *
 * UNAVAILABLE (no server yet, a restart) is retried with jittered exponential backoff
 * (50 ms doubling to 1 s) for `retrySeconds`, never beyond the call's deadline: every
 * adsvc RPC is free of side effects. Nothing else is retried.
 */
class Client {
  /**
   * @param {string} target "host:port"
   * @param {object} [options]
   * @param {string} [options.token] bearer token ("authorization: Bearer <token>")
   * @param {string} [options.tokenFile] read the token from the first line of this file
   * @param {number} [options.timeoutMs] default deadline of every call (none if unset)
   * @param {boolean|{caFile?: string, ca?: Buffer, certFile?: string, cert?: Buffer,
   *   keyFile?: string, key?: Buffer, serverName?: string}} [options.tls] `true`: TLS
   *   verified against the system roots; an object: a CA bundle, a client certificate
   *   (mTLS) and the name the server's certificate carries when it differs from the host
   * @param {number} [options.maxMessageBytes] largest message sent/received (64 MiB)
   * @param {number} [options.retrySeconds] how long UNAVAILABLE is retried (15; 0: never)
   * @param {object} [options.channelOptions] extra grpc-js channel options
   */
  constructor(target, {
    token, tokenFile, timeoutMs, tls, maxMessageBytes = 64 * 1024 * 1024, retrySeconds = 15,
    channelOptions = {},
  } = {}) {
    this.target = target;
    this.timeoutMs = timeoutMs;
    this.retrySeconds = retrySeconds;
    this.token = tokenFile ? readToken(tokenFile) : token;
    const { credentials, options } = channelSecurity(tls);
    this.stub = new PROTOCOL.AutodiffService(target, credentials, {
      'grpc.max_send_message_length': maxMessageBytes,
      'grpc.max_receive_message_length': maxMessageBytes,
      'grpc.initial_reconnect_backoff_ms': 200,
      'grpc.max_reconnect_backoff_ms': 1000,
      ...options,
      ...channelOptions,
    });
    this.compiled = new WeakMap(); // frozen graph -> Map(spec -> Compiled)
  }

  /**
   * One unary RPC with the token, a request id, the deadline and UNAVAILABLE retries.
   * @private
   */
  async call(method, request, { timeoutMs = this.timeoutMs } = {}) {
    const start = Date.now();
    const deadline = timeoutMs ? start + timeoutMs : Infinity;
    const retryEnd = Math.min(start + this.retrySeconds * 1000, deadline);
    const requestId = crypto.randomUUID();
    const metadata = new grpc.Metadata();
    metadata.set('x-request-id', requestId);
    if (this.token) metadata.set('authorization', `Bearer ${this.token}`);
    for (let attempt = 1; ; attempt++) {
      try {
        // eslint-disable-next-line no-await-in-loop
        return await new Promise((resolve, reject) => {
          const opts = deadline === Infinity ? {} : { deadline: new Date(deadline) };
          this.stub[method](request, metadata, opts, (err, resp) => (err ? reject(err) : resolve(resp)));
        });
      } catch (err) {
        const delay = Math.min(1000, 50 * 2 ** (attempt - 1)) * (0.5 + Math.random() / 2);
        if (err.code !== grpc.status.UNAVAILABLE || Date.now() + delay >= retryEnd) {
          const e = errorFromGrpc(err, requestId);
          if (attempt > 1 && e instanceof UnavailableError) {
            e.description += ` (tried ${attempt} times over ${((Date.now() - start) / 1000).toFixed(1)} s)`;
            e.message = e.description;
          }
          throw e;
        }
        // eslint-disable-next-line no-await-in-loop
        await sleep(delay);
      }
    }
  }

  /**
   * GetServerInfo: versions, the op table, the limits in force, counters.
   * @param {{timeoutMs?: number}} [options]
   * @returns {Promise<object>} the ServerInfo message
   */
  serverInfo(options = {}) {
    return this.call('GetServerInfo', {}, options);
  }

  /**
   * Differentiate (compile) a graph on the server.
   * @param {object} graph an adsvc.v1.Graph (from {@link GraphBuilder#build} or {@link graphFromJSON})
   * @param {{mode?: string, modes?: string[], order?: number, wrt?: string[], seed?: boolean,
   *   omitGraph?: boolean, timeoutMs?: number}} [options] see {@link differentiation};
   *   no mode: compile without differentiating (a handle for plain evaluation)
   * @returns {Promise<Compiled>} handle, the differentiated graph, its inputs and outputs
   */
  async differentiate(graph, options = {}) {
    const diff = differentiation(options);
    const g = asGraph(graph);
    const resp = await this.call('Differentiate', {
      graph: g, differentiation: diff, omit_graph: Boolean(options.omitGraph),
    }, options);
    return new Compiled(resp, g, diff);
  }

  /**
   * Evaluate a graph and return every output by name.
   *
   * `target` is a graph (sent inline, differentiated first with `options.mode`/`modes`
   * ... if given), a {@link Compiled} (evaluated by handle; re-sent when the server does
   * not hold the handle), or a handle string (re-sent with `options.graph` and the
   * differentiation options if given, else a miss throws HandleNotFoundError).
   * @param {object|Compiled|string} target
   * @param {Object<string, *>} inputs values by input name (numbers, arrays, typed arrays, {@link tensor}s)
   * @param {{graph?: object, mode?: string, modes?: string[], order?: number, wrt?: string[],
   *   seed?: boolean, timeoutMs?: number}} [options]
   * @returns {Promise<Object<string, *>>} decoded outputs (see {@link decodeTensor})
   */
  async evaluate(target, inputs, options = {}) {
    if (isGraph(target)) {
      const graph = asGraph(target);
      const resp = await this.call('Evaluate', {
        graph, differentiation: differentiation(options), inputs: encodeFeeds(inputs, graphSignature(graph)),
      }, options);
      return decodeMap(resp.outputs, 'outputs');
    }
    let compiled = target;
    if (typeof target === 'string') {
      const source = options.graph ? asGraph(options.graph) : undefined;
      compiled = {
        handle: target, source, differentiation: differentiation(options), inputs: source ? graphSignature(source) : {},
      };
    } else if (!(target instanceof Compiled)) {
      throw new UsageError('evaluate: target must be a graph, a Compiled or a handle string', { field: 'target' });
    }
    const feeds = encodeFeeds(inputs, compiled.inputs);
    try {
      const resp = await this.call('Evaluate', { handle: compiled.handle, inputs: feeds }, options);
      return decodeMap(resp.outputs, 'outputs');
    } catch (err) {
      if (!(err instanceof HandleNotFoundError) || !compiled.source) throw err;
    }
    // the server does not hold the handle (restart, eviction, another replica): re-send
    const resp = await this.call('Evaluate', {
      graph: compiled.source, differentiation: compiled.differentiation, inputs: feeds,
    }, options);
    if (compiled instanceof Compiled) compiled.handle = resp.handle;
    return decodeMap(resp.outputs, 'outputs');
  }

  /**
   * Value and gradient of a graph with one scalar float output (the Gradient RPC).
   * @param {object} graph
   * @param {Object<string, *>} inputs the graph's input values by name
   * @param {{wrt?: string[], mode?: string, timeoutMs?: number}} [options] `mode`:
   *   "reverse" (default, one sweep) or "forward" (one sweep per input element); `wrt`:
   *   default every float input
   * @returns {Promise<{value: *, gradients: Object<string, *>, outputName: string, handle: string}>}
   */
  async grad(graph, inputs, options = {}) {
    const g = asGraph(graph);
    const resp = await this.call('Gradient', {
      graph: g, mode: modeEnum(options.mode ?? 'reverse'), wrt: [...(options.wrt || [])],
      inputs: encodeFeeds(inputs, graphSignature(g)),
    }, options);
    return {
      value: decodeTensor(resp.value, 'value'),
      gradients: decodeMap(resp.gradients, 'gradients'),
      outputName: resp.output_name,
      handle: resp.handle,
    };
  }

  /**
   * Compile once per (frozen graph, differentiation); graphs from build()/graphFromJSON
   * are frozen, so repeated calls evaluate by handle only.
   * @private
   */
  async compiledFor(graph, options) {
    const key = JSON.stringify(differentiation(options));
    const cache = Object.isFrozen(graph) ? this.compiled.get(graph) || new Map() : null;
    if (cache && cache.has(key)) return cache.get(key);
    const compiled = await this.differentiate(graph, { ...options, omitGraph: true });
    if (cache) {
      cache.set(key, compiled);
      this.compiled.set(graph, cache);
    }
    return compiled;
  }

  /**
   * Jacobian-vector product: the outputs and J·t for every float output, by a forward
   * pass (Differentiate with MODE_FORWARD over the inputs `tangents` names, then Evaluate
   * with the `tangent:<x>` inputs).
   * @param {object} graph
   * @param {Object<string, *>} primals every input's value
   * @param {Object<string, *>} tangents tangent values by input name (the directions)
   * @param {{timeoutMs?: number}} [options]
   * @returns {Promise<{outputs: Object<string, *>, tangents: Object<string, *>}>}
   *   outputs by name; tangents by output name (the `tangent:<out>` outputs)
   */
  async jvp(graph, primals, tangents, options = {}) {
    const wrt = Object.keys(tangents);
    const compiled = await this.compiledFor(graph, { ...options, mode: 'forward', wrt });
    const feeds = { ...primals };
    for (const name of wrt) feeds[`tangent:${name}`] = tangents[name];
    return splitOutputs(await this.evaluate(compiled, feeds, options), 'tangent:');
  }

  /**
   * Vector-Jacobian product: the outputs and Jᵀ·c for the inputs `wrt` (default every
   * float input), by a reverse pass fed `cotangent:<out>` (zeros for outputs not given).
   * @param {object} graph
   * @param {Object<string, *>} primals every input's value
   * @param {Object<string, *>} cotangents cotangent values by output name
   * @param {{wrt?: string[], timeoutMs?: number}} [options]
   * @returns {Promise<{outputs: Object<string, *>, gradients: Object<string, *>}>}
   *   outputs by name; gradients by input name (the `grad:<x>` outputs)
   */
  async vjp(graph, primals, cotangents, options = {}) {
    const compiled = await this.compiledFor(graph, { ...options, mode: 'reverse' });
    const feeds = { ...primals };
    for (const [name, t] of Object.entries(compiled.inputs)) {
      if (name.startsWith('cotangent:')) {
        const out = name.slice('cotangent:'.length);
        feeds[name] = out in cotangents ? cotangents[out] : zeros(t);
      }
    }
    const { outputs, tangents: gradients } = splitOutputs(await this.evaluate(compiled, feeds, options), 'grad:');
    return { outputs, gradients };
  }

  /** Close the channel. Calls after close() fail. */
  close() {
    this.stub.close();
  }
}

function splitOutputs(all, prefix) {
  const outputs = {};
  const derived = {};
  for (const [name, v] of Object.entries(all)) {
    if (name.startsWith(prefix)) derived[name.slice(prefix.length)] = v;
    else if (!name.includes(':')) outputs[name] = v;
  }
  return { outputs, tangents: derived };
}

function readFile(file, what) {
  try {
    return fs.readFileSync(file);
  } catch (e) {
    throw new UsageError(`cannot read the ${what} ${JSON.stringify(file)}: ${e.message}`, { field: what.replace(/ /g, '_') });
  }
}

function readToken(file) {
  const token = readFile(file, 'token file').toString('utf8').split(/\r?\n/)[0].trim();
  if (!token) throw new UsageError(`the token file ${JSON.stringify(file)} is empty: its first line is the token`, { field: 'token_file' });
  return token;
}

function channelSecurity(tls) {
  if (!tls) return { credentials: grpc.credentials.createInsecure(), options: {} };
  const t = tls === true ? {} : tls;
  const ca = t.ca ?? (t.caFile ? readFile(t.caFile, 'CA file') : null);
  const cert = t.cert ?? (t.certFile ? readFile(t.certFile, 'certificate file') : null);
  const key = t.key ?? (t.keyFile ? readFile(t.keyFile, 'key file') : null);
  if (Boolean(cert) !== Boolean(key)) {
    throw new UsageError('a TLS client certificate needs its private key: give both cert and key, or neither', { field: 'tls' });
  }
  const options = t.serverName ? { 'grpc.ssl_target_name_override': t.serverName, 'grpc.default_authority': t.serverName } : {};
  return { credentials: grpc.credentials.createSsl(ca, key, cert), options };
}

module.exports = {
  VERSIONS,
  PROTOS_DIR,
  GraphBuilder,
  Value,
  graphFromJSON,
  tensor,
  encodeTensor,
  decodeTensor,
  toNested,
  dtypeName,
  attrValue,
  differentiation,
  statusDetails,
  errorFromGrpc,
  Client,
  Compiled,
  ERROR_CLASSES,
  AdsvcError,
  InvalidGraphError,
  VersionError,
  UnknownOpError,
  ArityError,
  AttributeError_,
  UndefinedReferenceError,
  ForwardReferenceError,
  DuplicateIdError,
  CycleError,
  ShapeError,
  DTypeError,
  NotDifferentiableError,
  InvalidRequestError,
  InputError,
  EvaluationError,
  LimitExceededError,
  HandleNotFoundError,
  UnauthenticatedError,
  DeadlineExceededError,
  UnavailableError,
  CancelledError,
  UsageError,
};
