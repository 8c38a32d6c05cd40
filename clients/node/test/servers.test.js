'use strict';
// What needs servers of its own: a handle compiled on one server evaluated on a fresh
// one (re-sent on NOT_FOUND), no server at all (UNAVAILABLE, retried for a bounded
// time), and a server that requires a bearer token.

const { test } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('fs');
const os = require('os');
const path = require('path');
const net = require('net');
const { execFileSync, spawnSync } = require('child_process');
const adsvc = require('..');
const { startServer } = require('../test-support/server');

const { Client, GraphBuilder } = adsvc;
const T = { timeout: 60000 };

function seedGraph() {
  const g = new GraphBuilder('seed');
  const x = g.input('x');
  const y = g.input('y');
  g.output('z', g.add(g.add(g.mul(x, x), g.mul(x, y)), 2));
  return g.build();
}

/** A port nothing listens on (bound, then closed). */
function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

test('a handle compiled on one server is re-sent to a fresh server (NOT_FOUND there)', T, async () => {
  const first = await startServer();
  let compiled;
  try {
    const c = new Client(first.target, { timeoutMs: 10000, retrySeconds: 0 });
    compiled = await c.differentiate(seedGraph(), { mode: 'reverse', seed: true, omitGraph: true });
    assert.equal(compiled.graph, null);
    assert.deepEqual(await c.evaluate(compiled, { x: 3, y: 4 }), { z: 23, 'grad:x': 10, 'grad:y': 3 });
    c.close();
  } finally {
    await first.stop();
  }
  const second = await startServer();
  try {
    const c = new Client(second.target, { timeoutMs: 10000, retrySeconds: 0 });
    // the raw protocol: the fresh server does not hold the handle
    await assert.rejects(c.evaluate(compiled.handle, { x: 3, y: 4 }), adsvc.HandleNotFoundError);
    // the client re-sends the graph, and the handle is the same (content hash)
    const handle = compiled.handle;
    assert.deepEqual(await c.evaluate(compiled, { x: 1, y: 2 }), { z: 5, 'grad:x': 4, 'grad:y': 1 });
    assert.equal(compiled.handle, handle);
    // now the server holds it: by handle alone
    assert.deepEqual(await c.evaluate(handle, { x: 3, y: 4 }), { z: 23, 'grad:x': 10, 'grad:y': 3 });
    // jvp compiles once per frozen graph, then evaluates by handle
    const g = seedGraph();
    assert.deepEqual((await c.jvp(g, { x: 3, y: 4 }, { x: 1, y: 0 })).tangents, { z: 10 });
    const before = (await c.serverInfo()).stats;
    assert.deepEqual((await c.jvp(g, { x: 3, y: 4 }, { x: 0, y: 1 })).tangents, { z: 3 });
    const after = (await c.serverInfo()).stats;
    assert.equal(after.cache_misses, before.cache_misses);
    c.close();
  } finally {
    await second.stop();
  }
});

test('no server: UnavailableError after a bounded retry', T, async () => {
  const port = await freePort();
  const c = new Client(`127.0.0.1:${port}`, { timeoutMs: 5000, retrySeconds: 0.5 });
  const start = Date.now();
  await assert.rejects(c.grad(seedGraph(), { x: 3, y: 4 }), (e) => {
    assert.ok(e instanceof adsvc.UnavailableError, `${e.name}: ${e.message}`);
    assert.equal(e.codeName, 'UNAVAILABLE');
    assert.match(e.description, /tried \d+ times/);
    return true;
  });
  const elapsed = Date.now() - start;
  assert.ok(elapsed < 4000, `${elapsed} ms`);
  c.close();
});

test('a server started later is reached while retrying', T, async () => {
  // the client is retrying UNAVAILABLE while the server starts
  const port = await freePort();
  const c = new Client(`127.0.0.1:${port}`, { timeoutMs: 30000, retrySeconds: 30 });
  const pending = c.grad(seedGraph(), { x: 3, y: 4 });
  const server = await startServer(['--port', String(port)]);
  try {
    assert.equal((await pending).value, 23);
  } finally {
    c.close();
    await server.stop();
  }
});

test('a server with a token: UnauthenticatedError without it, answers with it', T, async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'adsvc-node-'));
  const tokenFile = path.join(dir, 'token');
  fs.writeFileSync(tokenFile, 's3cret-token\n');
  const server = await startServer(['--token-file', tokenFile]);
  try {
    const anonymous = new Client(server.target, { timeoutMs: 10000, retrySeconds: 0 });
    await assert.rejects(anonymous.grad(seedGraph(), { x: 3, y: 4 }), (e) => {
      assert.ok(e instanceof adsvc.UnauthenticatedError, `${e.name}: ${e.message}`);
      assert.equal(e.codeName, 'UNAUTHENTICATED');
      return true;
    });
    anonymous.close();
    const wrong = new Client(server.target, { timeoutMs: 10000, retrySeconds: 0, token: 'nope' });
    await assert.rejects(wrong.serverInfo(), adsvc.UnauthenticatedError);
    wrong.close();
    for (const options of [{ token: 's3cret-token' }, { tokenFile }]) {
      const c = new Client(server.target, { timeoutMs: 10000, retrySeconds: 0, ...options });
      assert.equal((await c.grad(seedGraph(), { x: 3, y: 4 })).value, 23);
      assert.equal((await c.serverInfo()).limits.auth_required, true);
      c.close();
    }
  } finally {
    await server.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
  assert.throws(() => new Client('127.0.0.1:1', { tokenFile: path.join(dir, 'missing') }), adsvc.UsageError);
});

/** A self-signed certificate and key (openssl), valid for localhost and 127.0.0.1. */
function selfSigned(dir, name) {
  const key = path.join(dir, `${name}.key`);
  const cert = path.join(dir, `${name}.pem`);
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1',
    '-nodes', '-keyout', key, '-out', cert, '-days', '1', '-subj', `/CN=${name}`,
    '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1'], { stdio: 'ignore', timeout: 10000 });
  return { key, cert };
}

const HAVE_OPENSSL = spawnSync('openssl', ['version'], { timeout: 10000 }).status === 0;

test('TLS and mutual TLS', { ...T, skip: HAVE_OPENSSL ? false : 'openssl is not installed' }, async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'adsvc-node-tls-'));
  const srv = selfSigned(dir, 'localhost');
  const cli = selfSigned(dir, 'client');
  const server = await startServer(['--tls-cert', srv.cert, '--tls-key', srv.key, '--tls-client-ca', cli.cert]);
  const port = server.target.split(':')[1];
  try {
    const good = new Client(`localhost:${port}`, {
      timeoutMs: 10000, retrySeconds: 0, tls: { caFile: srv.cert, certFile: cli.cert, keyFile: cli.key },
    });
    assert.equal((await good.grad(seedGraph(), { x: 3, y: 4 })).value, 23);
    good.close();
    const noCert = new Client(`localhost:${port}`, { timeoutMs: 10000, retrySeconds: 0, tls: { caFile: srv.cert } });
    await assert.rejects(noCert.grad(seedGraph(), { x: 3, y: 4 }), adsvc.UnavailableError);
    noCert.close();
    const plaintext = new Client(`localhost:${port}`, { timeoutMs: 10000, retrySeconds: 0 });
    await assert.rejects(plaintext.serverInfo(), adsvc.UnavailableError);
    plaintext.close();
    assert.throws(() => new Client('localhost:1', { tls: { certFile: cli.cert } }), /needs its private key/);
  } finally {
    await server.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
