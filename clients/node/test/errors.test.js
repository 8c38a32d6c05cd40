'use strict';
// Status → typed error without a server: the rich details as the server packs them
// (adsvc/server/errors.py), a status without details, an unknown reason.

const { test } = require('node:test');
const assert = require('node:assert/strict');
const grpc = require('@grpc/grpc-js');
const protobuf = require('protobufjs');
const path = require('path');
const adsvc = require('..');

const GOOGLE = path.dirname(require.resolve('google-proto-files/package.json'));
const root = new protobuf.Root();
root.resolvePath = (origin, target) => path.join(GOOGLE, target);
root.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: true });

function packed(typeName, obj) {
  const type = root.lookupType(typeName);
  return { type_url: `type.googleapis.com/${typeName}`, value: type.encode(type.fromObject(obj)).finish() };
}

function grpcError(code, message, { reason, field, description, metadata = {} } = {}) {
  const md = new grpc.Metadata();
  if (reason) {
    const Status = root.lookupType('google.rpc.Status');
    const status = Status.fromObject({
      code,
      message,
      details: [
        packed('google.rpc.BadRequest', { field_violations: [{ field, description }] }),
        packed('google.rpc.ErrorInfo', { reason, domain: 'adsvc', metadata: { field, ...metadata } }),
      ],
    });
    md.set('grpc-status-details-bin', Buffer.from(Status.encode(status).finish()));
  }
  md.set('x-request-id', 'req-1');
  return Object.assign(new Error(message), { code, details: message, metadata: md });
}

test('rich details: class from the reason, field/description from BadRequest, cycle', () => {
  const e = adsvc.errorFromGrpc(grpcError(grpc.status.INVALID_ARGUMENT, 'CycleError: nodes[id=3]: a cycle', {
    reason: 'CycleError', field: 'nodes[id=3]', description: 'a cycle', metadata: { context: 'nearby', cycle: '3,4,5' },
  }));
  assert.ok(e instanceof adsvc.CycleError && e instanceof adsvc.InvalidGraphError);
  assert.equal(e.field, 'nodes[id=3]');
  assert.equal(e.description, 'a cycle');
  assert.equal(e.context, 'nearby');
  assert.deepEqual(e.cycle, [3, 4, 5]);
  assert.equal(e.requestId, 'req-1');
  assert.equal(e.message, 'nodes[id=3]: a cycle');
  const d = adsvc.statusDetails(grpcError(grpc.status.INVALID_ARGUMENT, 'm', { reason: 'ShapeError', field: 'f', description: 'd' }));
  assert.equal(d.reason, 'ShapeError');
  assert.equal(d.domain, 'adsvc');
  assert.equal(d.status.message, 'm');
});

test('no details: the class by status code; unknown reasons fall back to the code', () => {
  const cases = [
    [grpc.status.DEADLINE_EXCEEDED, adsvc.DeadlineExceededError],
    [grpc.status.UNAVAILABLE, adsvc.UnavailableError],
    [grpc.status.RESOURCE_EXHAUSTED, adsvc.LimitExceededError],
    [grpc.status.NOT_FOUND, adsvc.HandleNotFoundError],
    [grpc.status.UNAUTHENTICATED, adsvc.UnauthenticatedError],
    [grpc.status.CANCELLED, adsvc.CancelledError],
    [grpc.status.INVALID_ARGUMENT, adsvc.InvalidRequestError],
  ];
  for (const [code, cls] of cases) {
    const e = adsvc.errorFromGrpc(grpcError(code, 'boom'));
    assert.equal(e.constructor, cls, cls.name);
    assert.equal(e.code, code);
    assert.equal(e.description, 'boom');
  }
  const internal = adsvc.errorFromGrpc(grpcError(grpc.status.INTERNAL, 'bug'));
  assert.equal(internal.constructor, adsvc.AdsvcError);
  assert.equal(internal.description, 'INTERNAL: bug');
  const future = adsvc.errorFromGrpc(grpcError(grpc.status.RESOURCE_EXHAUSTED, 'x', {
    reason: 'SomeFutureError', field: 'nodes', description: 'too many',
  }));
  assert.equal(future.constructor, adsvc.LimitExceededError);
  assert.equal(future.reason, 'SomeFutureError');
  assert.equal(future.field, 'nodes');
  // garbage in the trailer: mapped by the code, not a crash
  const md = new grpc.Metadata();
  md.set('grpc-status-details-bin', Buffer.from([0xff, 0xff, 0xff]));
  const garbage = adsvc.errorFromGrpc(Object.assign(new Error('g'), { code: 5, details: 'g', metadata: md }));
  assert.equal(garbage.constructor, adsvc.HandleNotFoundError);
});

test('tensor encoding: raw little-endian bytes, exact conversions', () => {
  const t = adsvc.encodeTensor([[1, 2], [3, 4]], 'float32');
  assert.equal(t.dtype, 'DTYPE_FLOAT32');
  assert.deepEqual(t.dims, [2, 2]);
  assert.deepEqual([...t.raw], [...Buffer.from(new Float32Array([1, 2, 3, 4]).buffer)]);
  assert.deepEqual([...adsvc.encodeTensor(true, 'bool').raw], [1]);
  assert.deepEqual([...adsvc.encodeTensor(-2, 'int32').raw], [0xfe, 0xff, 0xff, 0xff]);
  assert.throws(() => adsvc.encodeTensor(2 ** 31, 'int32', 'inputs.n'), adsvc.InputError);
  assert.throws(() => adsvc.encodeTensor(2, 'bool'), adsvc.InputError);
  assert.throws(() => adsvc.encodeTensor('x', 'float64'), adsvc.InputError);
  assert.throws(() => adsvc.encodeTensor(adsvc.tensor([1, 2, 3], [2, 2])), adsvc.InputError);
  // decoding from an unaligned slice, and from `values`
  const buf = Buffer.alloc(17);
  buf.writeDoubleLE(1.5, 1);
  buf.writeDoubleLE(-2, 9);
  const v = adsvc.decodeTensor({ dtype: 'DTYPE_FLOAT64', dims: [2], raw: buf.subarray(1) });
  assert.deepEqual(Array.from(v), [1.5, -2]);
  assert.deepEqual(v.dims, [2]);
  assert.equal(adsvc.decodeTensor({ dtype: 1, dims: [], values: [7] }), 7);
  assert.equal(adsvc.decodeTensor({ dtype: 'DTYPE_INT64', dims: [], raw: Buffer.from(new BigInt64Array([2n ** 60n]).buffer) }), 2n ** 60n);
  assert.throws(() => adsvc.decodeTensor({ dtype: 'DTYPE_FLOAT64', dims: [2], raw: Buffer.alloc(8) }), adsvc.AdsvcError);
});
