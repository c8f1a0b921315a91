#!/usr/bin/env node
// A native-solc look-alike over solcjs's JS API, so py-solc-x and forge (`--use contracts/solc.js`) can drive it.
//
//   solc.js --version                 -> "solc, the solidity compiler commandline interface\nVersion: X"
//   solc.js --standard-json [opts]    -> standard JSON input on stdin, standard JSON output on stdout
//
// solcjs's own CLI prints a line about SMT solvers before its JSON and lacks these flags, hence this wrapper.
// Imports the input does not carry are read from disk: `@scope/pkg/...` from node_modules (next to this
// repository, then the working directory), anything else relative to --base-path / --include-path / the
// working directory. Accepted and used only as search roots: --base-path, --include-path, --allow-paths.
'use strict';

const fs = require('fs');
const path = require('path');

const REPO_ROOT = path.resolve(__dirname, '..');

function usage(code) {
  process.stderr.write('usage: solc.js --version | --standard-json [--base-path P] [--include-path P] [--allow-paths P]\n');
  process.exit(code);
}

function parseArgs(argv) {
  const opts = { version: false, standardJson: false, roots: [] };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--version') opts.version = true;
    else if (a === '--standard-json') opts.standardJson = true;
    else if (a === '--base-path' || a === '--include-path' || a === '--allow-paths') {
      const v = argv[++i];
      if (v === undefined) {
        process.stderr.write(`${a} needs a value\n`);
        usage(1);
      }
      for (const p of v.split(',')) if (p) opts.roots.push(path.resolve(p));
    } else if (a.startsWith('--base-path=') || a.startsWith('--include-path=') || a.startsWith('--allow-paths=')) {
      for (const p of a.slice(a.indexOf('=') + 1).split(',')) if (p) opts.roots.push(path.resolve(p));
    } else if (a === '-' ) {
      // stdin marker, implied by --standard-json
    } else {
      process.stderr.write(`unrecognised option '${a}'\n`);
      process.exit(1);
    }
  }
  return opts;
}

function searchRoots(extraRoots) {
  const roots = [...extraRoots, process.cwd(), REPO_ROOT];
  return [...new Set(roots)];
}

function makeImportCallback(roots) {
  return function findImports(importPath) {
    const candidates = [];
    if (importPath.startsWith('@')) {
      for (const r of roots) candidates.push(path.join(r, 'node_modules', importPath));
    }
    for (const r of roots) candidates.push(path.resolve(r, importPath));
    for (const c of candidates) {
      if (fs.existsSync(c) && fs.statSync(c).isFile()) {
        return { contents: fs.readFileSync(c, 'utf8') };
      }
    }
    return { error: `File not found: ${importPath} (searched ${candidates.join(', ')})` };
  };
}

function readStdin() {
  return fs.readFileSync(0, 'utf8');
}

function main() {
  const opts = parseArgs(process.argv.slice(2));
  const solc = require('solc');
  if (opts.version) {
    process.stdout.write(`solc, the solidity compiler commandline interface\nVersion: ${solc.version()}\n`);
    return;
  }
  if (!opts.standardJson) usage(1);
  const input = readStdin();
  const output = solc.compile(input, { import: makeImportCallback(searchRoots(opts.roots)) });
  process.stdout.write(output);
  process.stdout.write('\n');
}

main();
