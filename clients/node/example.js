#!/usr/bin/env node
'use strict';
/**
 * The adsvc Node.js client against a running server:
 *
 *     adsvc serve --port 50051 &
 *     node example.js 127.0.0.1:50051 [--token TOKEN]
 *
 * Builds `z = x*x + x*y + 2`, prints its value and gradient at x=3, y=4 (both modes), a
 * Jacobian-vector product, the gradient of a vector function, and the typed error a
 * malformed graph gets.
 * @module example
 */

const {
  Client, GraphBuilder, InvalidGraphError, AdsvcError,
} = require('./adsvc');

/**
 * Run the example against `target`; resolves when done, rejects on an unexpected error.
 * @param {string} target "host:port"
 * @param {{token?: string}} [options]
 * @returns {Promise<void>}
 */
async function main(target, { token } = {}) {
  const client = new Client(target, { timeoutMs: 30000, token });
  try {
    const g = new GraphBuilder('seed');
    const x = g.input('x');
    const y = g.input('y');
    g.output('z', g.add(g.add(g.mul(x, x), g.mul(x, y)), 2));
    const seed = g.build();

    for (const mode of ['reverse', 'forward']) {
      const { value, gradients } = await client.grad(seed, { x: 3, y: 4 }, { mode });
      console.log(`${mode}: value: ${value}`);
      console.log(`${mode}: gradient: x = ${gradients.x}, y = ${gradients.y}`);
    }
    const { tangents } = await client.jvp(seed, { x: 3, y: 4 }, { x: 1, y: 0 });
    console.log(`jvp along (1, 0): ${tangents.z}`);

    const v = new GraphBuilder('sum_of_squares');
    const xs = v.input('x', 'float64', [3]);
    v.output('s', v.sum(v.mul(xs, xs)));
    const r = await client.grad(v.build(), { x: [1, 2, 3] });
    console.log(`sum(x*x) at [1, 2, 3]: value ${r.value}, gradient [${Array.from(r.gradients.x).join(', ')}]`);

    const bad = {
      ir_version: 1,
      opset_version: 1,
      inputs: [{ id: 0, name: 'x', type: { dtype: 'DTYPE_FLOAT64' } }],
      nodes: [{ id: 1, op: 'mul', operands: [0, 9] }],
      outputs: [{ name: 'z', id: 1 }],
    };
    try {
      await client.grad(bad, { x: 1 });
    } catch (e) {
      if (!(e instanceof InvalidGraphError)) throw e;
      console.log(`a dangling operand: ${e.name} (${e.codeName}) at ${e.field}: ${e.description}`);
    }
  } finally {
    client.close();
  }
}

if (require.main === module) {
  const args = process.argv.slice(2);
  let target;
  let token = process.env.ADSVC_TOKEN;
  for (let i = 0; i < args.length; i++) {
    if (args[i] === '--token') token = args[++i];
    else if (!target && !args[i].startsWith('-')) target = args[i];
    else target = undefined;
  }
  if (!target || (args.includes('--token') && !token)) {
    console.error('usage: node example.js HOST:PORT [--token TOKEN]');
    process.exit(2);
  }
  main(target, { token }).catch((e) => {
    console.error(e instanceof AdsvcError ? `adsvc: error: ${e.name}: ${e.message}` : e);
    process.exit(1);
  });
}

module.exports = { main };
