'use strict';
/**
 * Test helper: an adsvc server in a child process (`python -m adsvc.server --host
 * 127.0.0.1 --port 0`, the python from $ADSVC_PYTHON or `python3`), its port read from
 * the line it announces, stopped by PID. Every wait is bounded.
 * @module test-support/server
 */

const { spawn } = require('child_process');
const path = require('path');

const REPO = path.resolve(__dirname, '..', '..', '..');
const PYTHON = process.env.ADSVC_PYTHON || 'python3';
const START_TIMEOUT_MS = 30000;
const STOP_TIMEOUT_MS = 10000;
const running = new Set();

// a test process that dies anyway still takes its servers with it
process.on('exit', () => {
  for (const child of running) {
    try { process.kill(child.pid, 'SIGKILL'); } catch { /* already gone */ }
  }
});

/**
 * Start a server; resolves to `{target, pid, log, stop}` once it announces its port.
 * @param {string[]} [args] extra flags of `adsvc serve`
 * @param {{env?: object}} [options] extra environment variables
 * @returns {Promise<{target: string, pid: number, log: () => string, stop: () => Promise<number|null>}>}
 */
function startServer(args = [], { env = {} } = {}) {
  const child = spawn(PYTHON, ['-m', 'adsvc.server', '--host', '127.0.0.1', '--port', '0',
    '--grace', '1', ...args], {
    cwd: REPO, env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'],
  });
  running.add(child);
  let out = '';
  const log = () => out;
  const exited = new Promise((resolve) => { child.on('exit', (code, signal) => resolve(code ?? signal)); });
  child.stderr.on('data', (d) => { out += d; });
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) process.kill(child.pid, 'SIGTERM');
    const timer = setTimeout(() => { try { process.kill(child.pid, 'SIGKILL'); } catch { /* gone */ } }, STOP_TIMEOUT_MS);
    const status = await exited;
    clearTimeout(timer);
    running.delete(child);
    return status;
  };
  let started = false;
  return new Promise((resolve, reject) => {
    const fail = (why) => {
      if (started) return;
      started = true;
      clearTimeout(timer);
      stop().finally(() => reject(new Error(`${why}; server output:\n${out}`)));
    };
    const timer = setTimeout(() => fail(`no "adsvc serving on" line within ${START_TIMEOUT_MS} ms`), START_TIMEOUT_MS);
    child.on('error', (e) => fail(`cannot run ${PYTHON}: ${e.message}`));
    child.on('exit', (code) => fail(`the server exited (${code}) before serving`));
    child.stdout.on('data', (d) => {
      out += d;
      const m = /adsvc serving on ([\d.]+):(\d+)/.exec(out);
      if (m && !started) {
        started = true;
        clearTimeout(timer);
        resolve({ target: `${m[1]}:${m[2]}`, pid: child.pid, log, stop });
      }
    });
  });
}

module.exports = { startServer, REPO };
