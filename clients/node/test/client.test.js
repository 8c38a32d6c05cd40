'use strict';
// The client against one real server: gradients in both modes, evaluate, jvp/vjp,
// vectors and matrices, typed errors from the rich status details, handles, JSON graphs,
// the example script.

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('fs');
const path = require('path');
const { execFile } = require('child_process');
const adsvc = require('..');
const { startServer, REPO } = require('../test-support/server');

const {
  Client, GraphBuilder, graphFromJSON, tensor, toNested,
} = adsvc;
const T = { timeout: 30000 };

let server;
let client;

before(async () => {
  server = await startServer();
  client = new Client(server.target, { timeoutMs: 10000, retrySeconds: 2 });
});

after(async () => {
  if (client) client.close();
  if (server) await server.stop();
});

function seedGraph() {
  const g = new GraphBuilder('seed');
  const x = g.input('x');
  const y = g.input('y');
  g.output('z', g.add(g.add(g.mul(x, x), g.mul(x, y)), 2));
  return g.build();
}

function sumOfSquares() {
  const g = new GraphBuilder();
  const x = g.input('x', 'float64', [3]);
  g.output('s', g.sum(g.mul(x, x)));
  return g.build();
}

/** The graph of the seed example with one operand pointing nowhere. */
function danglingGraph() {
  return {
    ir_version: 1,
    opset_version: 1,
    inputs: [{ id: 0, name: 'x', type: { dtype: 'DTYPE_FLOAT64' } },
      { id: 1, name: 'y', type: { dtype: 'DTYPE_FLOAT64' } }],
    nodes: [{ id: 2, op: 'mul', operands: [0, 0] }, { id: 3, op: 'mul', operands: [0, 42] },
      { id: 4, op: 'add', operands: [2, 3] }],
    outputs: [{ name: 'z', id: 4 }],
  };
}

test('builder: the seed graph is the README JSON graph', () => {
  const g = seedGraph();
  assert.equal(g.ir_version, 1);
  assert.equal(g.opset_version, 1);
  assert.deepEqual(g.inputs.map((i) => [i.id, i.name, i.type.dtype]), [[0, 'x', 'DTYPE_FLOAT64'], [1, 'y', 'DTYPE_FLOAT64']]);
  assert.deepEqual(g.nodes.map((n) => [n.id, n.op, n.operands]), [[2, 'mul', [0, 0]], [3, 'mul', [0, 1]],
    [4, 'add', [2, 3]], [5, 'constant', []], [6, 'add', [4, 5]]]);
  assert.deepEqual([...g.nodes[3].value.raw], [...Buffer.from(new Float64Array([2]).buffer)]);
  assert.deepEqual(g.outputs, [{ name: 'z', id: 6 }]);
  assert.ok(Object.isFrozen(g) && Object.isFrozen(g.nodes[0]));
});

test('seed example: value 23, gradient (10, 3) in reverse and forward mode', T, async () => {
  for (const mode of ['reverse', 'forward']) {
    const r = await client.grad(seedGraph(), { x: 3, y: 4 }, { mode });
    assert.equal(r.value, 23, mode);
    assert.deepEqual({ ...r.gradients }, { x: 10, y: 3 }, mode);
    assert.equal(r.outputName, 'z');
    assert.match(r.handle, /^[0-9a-f]{64}$/);
  }
  const onlyX = await client.grad(seedGraph(), { x: 3, y: 4 }, { wrt: ['x'] });
  assert.deepEqual({ ...onlyX.gradients }, { x: 10 });
});

test('evaluate inline; differentiate then evaluate by handle', T, async () => {
  assert.deepEqual(await client.evaluate(seedGraph(), { x: 3, y: 4 }), { z: 23 });
  const compiled = await client.differentiate(seedGraph(), { mode: 'reverse', seed: true });
  assert.deepEqual(Object.keys(compiled.inputs), ['x', 'y']);
  assert.deepEqual(Object.keys(compiled.outputs).sort(), ['grad:x', 'grad:y', 'z']);
  assert.ok(compiled.graph.nodes.length > 0);
  assert.deepEqual(await client.evaluate(compiled, { x: 3, y: 4 }), { z: 23, 'grad:x': 10, 'grad:y': 3 });
  // the Hessian-vector product names: tangent2:x in, tangent2:grad:x out
  const hvp = await client.evaluate(seedGraph(), { x: 3, y: 4, 'tangent2:x': 1, 'tangent2:y': 0 },
    { modes: ['reverse', 'forward'], seed: true });
  assert.equal(hvp['tangent2:grad:x'], 2);
  assert.equal(hvp['tangent2:grad:y'], 1);
});

test('jvp of the seed along (1, 0) is 10, along (0, 1) is 3; vjp', T, async () => {
  const g = seedGraph();
  assert.deepEqual(await client.jvp(g, { x: 3, y: 4 }, { x: 1, y: 0 }), { outputs: { z: 23 }, tangents: { z: 10 } });
  assert.deepEqual((await client.jvp(g, { x: 3, y: 4 }, { x: 0, y: 1 })).tangents, { z: 3 });
  assert.deepEqual((await client.jvp(g, { x: 3, y: 4 }, { y: 2 })).tangents, { z: 6 });
  const v = await client.vjp(g, { x: 3, y: 4 }, { z: 2 });
  assert.deepEqual(v.outputs, { z: 23 });
  assert.deepEqual({ ...v.gradients }, { x: 20, y: 6 });
});

test('vector input: sum(x*x) at [1, 2, 3] has gradient [2, 4, 6]', T, async () => {
  for (const mode of ['reverse', 'forward']) {
    for (const x of [[1, 2, 3], new Float64Array([1, 2, 3]), tensor([1, 2, 3], [3])]) {
      const r = await client.grad(sumOfSquares(), { x }, { mode });
      assert.equal(r.value, 14);
      assert.ok(r.gradients.x instanceof Float64Array);
      assert.deepEqual(Array.from(r.gradients.x), [2, 4, 6]);
      assert.deepEqual(r.gradients.x.dims, [3]);
    }
  }
  const { tangents } = await client.jvp(sumOfSquares(), { x: [1, 2, 3] }, { x: [1, 1, 1] });
  assert.equal(tangents.s, 12);
});

test('matrices, float32, int and bool tensors round-trip', T, async () => {
  const g = new GraphBuilder();
  const m = g.input('m', 'float64', [2, 3]);
  const f = g.input('f', 'float32', [2]);
  const k = g.input('k', 'int64', [2]);
  g.output('twice', g.mul(m, 2));
  g.output('colsum', g.sum(m, { axes: [0] }));
  g.output('half', g.mul(f, 0.5));
  g.output('k1', g.add(k, 1));
  g.output('pos', g.gt(m, 2.5));
  g.output('t', g.transpose(m, [1, 0]));
  const out = await client.evaluate(g.build(), { m: [[1, 2, 3], [4, 5, 6]], f: [3, 5], k: [7, -9] });
  assert.deepEqual(out.twice.dims, [2, 3]);
  assert.deepEqual(toNested(out.twice), [[2, 4, 6], [8, 10, 12]]);
  assert.deepEqual(toNested(out.colsum), [5, 7, 9]);
  assert.ok(out.half instanceof Float32Array);
  assert.deepEqual(Array.from(out.half), [1.5, 2.5]);
  assert.ok(out.k1 instanceof BigInt64Array);
  assert.deepEqual(Array.from(out.k1), [8n, -8n]);
  assert.equal(out.pos.dtype, 'bool');
  assert.deepEqual(toNested(out.pos), [[false, false, true], [true, true, true]]);
  assert.deepEqual(toNested(out.t), [[1, 4], [2, 5], [3, 6]]);
  // an output fed back as an input keeps its shape
  const again = await client.evaluate(g.build(), { m: out.twice, f: out.half, k: out.k1 });
  assert.deepEqual(toNested(again.twice), [[4, 8, 12], [16, 20, 24]]);
});

test('a dangling operand: INVALID_ARGUMENT as UndefinedReferenceError naming the node', T, async () => {
  for (const call of [
    () => client.grad(danglingGraph(), { x: 3, y: 4 }),
    () => client.evaluate(danglingGraph(), { x: 3, y: 4 }),
    () => client.differentiate(danglingGraph(), { mode: 'forward' }),
  ]) {
    await assert.rejects(call, (e) => {
      assert.ok(e instanceof adsvc.UndefinedReferenceError, e.name);
      assert.ok(e instanceof adsvc.InvalidGraphError && e instanceof adsvc.AdsvcError && e instanceof Error);
      assert.equal(e.name, 'UndefinedReferenceError');
      assert.equal(e.reason, 'UndefinedReferenceError');
      assert.equal(e.codeName, 'INVALID_ARGUMENT');
      assert.equal(e.code, 3);
      assert.equal(e.field, 'nodes[id=3]');
      assert.match(e.description, /42/);
      assert.match(e.message, /^nodes\[id=3\]: /);
      assert.match(e.context, /%3/);
      assert.match(e.requestId, /^[0-9a-f-]{36}$/);
      return true;
    });
  }
});

test('other typed errors: ShapeError, InputError, UnknownOpError, InvalidRequestError, NotDifferentiableError', T, async () => {
  const g = new GraphBuilder();
  g.output('z', g.add(g.input('a', 'float64', [2]), g.input('b', 'float64', [3])));
  await assert.rejects(client.evaluate(g.build(), { a: [1, 2], b: [1, 2, 3] }),
    (e) => e instanceof adsvc.ShapeError && /^nodes\[id=\d+\]$/.test(e.field));
  await assert.rejects(client.evaluate(seedGraph(), { x: 3 }),
    (e) => e instanceof adsvc.InputError && e.field === 'inputs.y' && e.codeName === 'INVALID_ARGUMENT');
  await assert.rejects(client.evaluate(seedGraph(), { x: [1, 2], y: 1 }),
    (e) => e instanceof adsvc.InputError && e.field === 'inputs.x' && /shape/.test(e.description));
  const u = new GraphBuilder();
  u.output('z', u.op('frobnicate', [u.input('x')]));
  await assert.rejects(client.evaluate(u.build(), { x: 1 }), (e) => e instanceof adsvc.UnknownOpError);
  await assert.rejects(client.grad(seedGraph(), { x: 3, y: 4 }, { wrt: ['nope'] }),
    (e) => e instanceof adsvc.InvalidRequestError && /nope/.test(e.message));
  const i = new GraphBuilder();
  i.output('z', i.cast(i.input('n', 'int32'), 'float64'));
  await assert.rejects(client.grad(i.build(), { n: 2 }, { wrt: ['n'] }),
    (e) => e instanceof adsvc.NotDifferentiableError);
  // checked before sending: not numbers, ragged arrays, inexact ints
  assert.throws(() => adsvc.encodeTensor([[1, 2], [3]], 'float64', 'inputs.x'),
    (e) => e instanceof adsvc.InputError && e.field === 'inputs.x');
  await assert.rejects(client.evaluate(i.build(), { n: 2.5 }),
    (e) => e instanceof adsvc.InputError && e.field === 'inputs.n' && e.requestId === '');
});

test('handles: a bogus handle is HandleNotFoundError; with the graph supplied it is re-sent', T, async () => {
  const bogus = 'f'.repeat(64);
  await assert.rejects(client.evaluate(bogus, { x: 3, y: 4 }), (e) => {
    assert.ok(e instanceof adsvc.HandleNotFoundError, e.name);
    assert.equal(e.codeName, 'NOT_FOUND');
    return true;
  });
  assert.deepEqual(await client.evaluate(bogus, { x: 3, y: 4 }, { graph: seedGraph() }), { z: 23 });
  const out = await client.evaluate(bogus, { x: 3, y: 4 }, { graph: seedGraph(), mode: 'reverse', seed: true });
  assert.deepEqual(out, { z: 23, 'grad:x': 10, 'grad:y': 3 });
});

test('graphFromJSON reads the hand-written graph of protos/README.md', T, async () => {
  const readme = fs.readFileSync(path.join(REPO, 'protos', 'README.md'), 'utf8');
  const json = /```json\n([\s\S]*?)```/.exec(readme)[1];
  const g = graphFromJSON(json);
  assert.equal(g.ir_version, 1);
  assert.equal(g.nodes[3].value.values[0], 2);
  const r = await client.grad(g, { x: 3, y: 4 });
  assert.equal(r.value, 23);
  assert.deepEqual({ ...r.gradients }, { x: 10, y: 3 });
  assert.throws(() => graphFromJSON({ irVersion: 1, bogus: 1 }), adsvc.InvalidGraphError);
  // the parsed JSON object itself is accepted too (converted, not silently dropped)
  assert.deepEqual(await client.evaluate(JSON.parse(json), { x: 3, y: 4 }), { z: 23 });
  assert.deepEqual((await client.jvp(JSON.parse(json), { x: 3, y: 4 }, { x: 1 })).tangents, { z: 10 });
});

test('serverInfo: versions, the op table, limits', T, async () => {
  const info = await client.serverInfo();
  // the newest versions the server reads (this client writes version 1 graphs)
  assert.equal(info.ir_version, 2);
  assert.equal(info.opset_version, 2);
  const add = info.ops.find((o) => o.name === 'add');
  assert.equal(add.arity, 2);
  assert.equal(add.derivative, 'DERIVATIVE_RULE');
  assert.ok(info.limits.max_message_bytes > 0);
  assert.equal(info.limits.auth_required, false);
  // every op a GraphBuilder method names is one the server knows
  const known = new Set(info.ops.map((o) => o.name));
  for (const name of ['add', 'sub', 'mul', 'div', 'pow', 'sin', 'cos', 'exp', 'log', 'tanh', 'sum', 'mean',
    'max', 'min', 'logsumexp', 'matmul', 'where', 'cast', 'reshape', 'transpose', 'broadcast_to',
    'concat', 'slice', 'take', 'stop_gradient', 'gt', 'sigmoid', 'softplus', 'sqrt', 'square']) {
    assert.ok(known.has(name), name);
  }
});

test('example.js runs against the server', T, async () => {
  const stdout = await new Promise((resolve, reject) => {
    execFile(process.execPath, [path.join(__dirname, '..', 'example.js'), server.target],
      { timeout: 20000 }, (err, out, errOut) => (err ? reject(new Error(`${err.message}\n${errOut}`)) : resolve(out)));
  });
  assert.match(stdout, /reverse: value: 23\n/);
  assert.match(stdout, /forward: gradient: x = 10, y = 3\n/);
  assert.match(stdout, /jvp along \(1, 0\): 10\n/);
  assert.match(stdout, /gradient \[2, 4, 6\]/);
  assert.match(stdout, /UndefinedReferenceError \(INVALID_ARGUMENT\) at nodes\[id=1\]/);
});

test('the error classes are the Python SDK\'s: same names, parents and status codes', T, async () => {
  const { execFileSync } = require('child_process');
  const script = 'import json; from adsvc_protocol.errors import ERROR_CLASSES as C; '
    + 'print(json.dumps({n: [c.__mro__[1].__name__, c.grpc_code] for n, c in C.items()}))';
  const python = JSON.parse(execFileSync(process.env.ADSVC_PYTHON || 'python3', ['-c', script],
    { cwd: REPO, timeout: 20000 }).toString());
  assert.deepEqual(Object.keys(adsvc.ERROR_CLASSES).sort(), Object.keys(python).sort());
  for (const [name, [parent, code]] of Object.entries(python)) {
    const cls = adsvc.ERROR_CLASSES[name];
    assert.equal(cls, adsvc[name], name);
    assert.equal(cls.grpcCode, code, name);
    if (name !== 'AdsvcError') assert.equal(Object.getPrototypeOf(cls).name, parent, name);
    assert.equal(new cls('d', { field: 'f' }).codeName, code);
  }
});
