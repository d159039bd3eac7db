// The test fixture: small exports and the Python runtime's answers, made by `python -m tools.node_fixture`
// (once; cached under .pytest_cache/node-host-fixture). MAVEN_NODE_FIXTURE points at a ready one;
// MAVEN_PYTHON picks the interpreter (default: the repository's .venv, else python3).

import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
export const REPO = path.resolve(here, '..', '..', '..');

let cached = null;

export function fixture() {
  if (cached) return cached;
  let dir = process.env.MAVEN_NODE_FIXTURE;
  if (!dir) {
    const venv = path.join(REPO, '.venv', 'bin', 'python');
    const python = process.env.MAVEN_PYTHON ?? (fs.existsSync(venv) ? venv : 'python3');
    dir = execFileSync(python, ['-m', 'tools.node_fixture'], { cwd: REPO, encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] })
      .trim().split('\n').pop();
  }
  const golden = JSON.parse(fs.readFileSync(path.join(dir, 'golden.json'), 'utf8'));
  cached = {
    dir,
    golden,
    exports: Object.fromEntries(Object.entries(golden.exports).map(([k, v]) => [k, path.resolve(dir, v)])),
    image: (name) => path.join(dir, 'images', name),
  };
  return cached;
}
