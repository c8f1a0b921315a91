// Reference side of tests/chain/test_merkle.py: builds each case with OpenZeppelin's own StandardMerkleTree.
// stdin:  {"cases": [{"encoding": [...], "values": [[...]], "sortLeaves": bool, "pythonDump": {...}|null}]}
// stdout: [{"root", "proofs": [[hex]], "dump", "loadedRoot"}]   (loadedRoot: root of pythonDump after load+validate)
'use strict';
const fs = require('fs');
const { StandardMerkleTree } = require('@openzeppelin/merkle-tree');

const input = JSON.parse(fs.readFileSync(0, 'utf8'));
const out = input.cases.map((c) => {
  const tree = StandardMerkleTree.of(c.values, c.encoding, { sortLeaves: c.sortLeaves !== false });
  const proofs = c.values.map((_, i) => tree.getProof(i));
  const loadedRoot = c.pythonDump ? StandardMerkleTree.load(c.pythonDump).root : null;
  return { root: tree.root, proofs, dump: tree.dump(), loadedRoot };
});
process.stdout.write(JSON.stringify(out));
