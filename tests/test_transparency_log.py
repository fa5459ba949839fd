"""The RFC 9162 Merkle tree against Certificate Transparency's reference vectors (the leaves, tree
heads for sizes 0..8, audit paths and consistency proofs of RFC 6962's reference implementation),
and the append-only manifest log built on it."""
from __future__ import annotations

import json
import random

import pytest

from llmserve.privacy import merkle
from llmserve.privacy.translog import Checkpoint, TransparencyLog, manifest_leaf

DATA = [bytes.fromhex(h) for h in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                                   "606162636465666768696a6b6c6d6e6f")]
LEAVES = [merkle.leaf_hash(d) for d in DATA]
ROOTS = ["e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
         "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
         "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
         "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
         "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
         "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
         "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
         "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
         "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"]
# (leaf index, tree size, audit path)
INCLUSION = [
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (1, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]
# (old size, new size, consistency proof)
CONSISTENCY = [
    (1, 1, []),
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]


def test_tree_heads_match_the_reference():
    for n in range(len(DATA) + 1):
        assert merkle.root(LEAVES[:n]).hex() == ROOTS[n]


@pytest.mark.parametrize("index,size,path", INCLUSION)
def test_audit_paths_match_the_reference(index, size, path):
    proof = merkle.inclusion_proof(index, LEAVES[:size])
    assert [p.hex() for p in proof] == path
    root = bytes.fromhex(ROOTS[size])
    assert merkle.verify_inclusion(index, size, LEAVES[index], proof, root)
    assert not merkle.verify_inclusion(index, size, LEAVES[(index + 1) % size], proof, root)
    if proof:
        assert not merkle.verify_inclusion(index, size, LEAVES[index], proof[:-1], root)


@pytest.mark.parametrize("old,new,path", CONSISTENCY)
def test_consistency_proofs_match_the_reference(old, new, path):
    proof = merkle.consistency_proof(old, LEAVES[:new])
    assert [p.hex() for p in proof] == path
    old_root, new_root = bytes.fromhex(ROOTS[old]), bytes.fromhex(ROOTS[new])
    assert merkle.verify_consistency(old, new, proof, old_root, new_root)
    if old != new:
        assert not merkle.verify_consistency(old, new, proof, bytes.fromhex(ROOTS[old + 1]), new_root)


def test_every_proof_of_every_tree_shape_verifies_and_a_changed_leaf_does_not():
    rng = random.Random(9162)
    leaves = [merkle.leaf_hash(rng.randbytes(rng.randrange(20))) for _ in range(37)]
    roots = [merkle.root(leaves[:n]) for n in range(len(leaves) + 1)]
    for n in range(1, len(leaves) + 1):
        for i in range(n):
            proof = merkle.inclusion_proof(i, leaves[:n])
            assert merkle.verify_inclusion(i, n, leaves[i], proof, roots[n])
        for m in range(1, n + 1):
            assert merkle.verify_consistency(m, n, merkle.consistency_proof(m, leaves[:n]), roots[m], roots[n])
    rewritten = list(leaves)
    rewritten[3] = merkle.leaf_hash(b"rewritten")
    proof = merkle.consistency_proof(10, rewritten[:30])
    assert not merkle.verify_consistency(10, 30, proof, roots[10], merkle.root(rewritten[:30]))


def test_the_manifest_log_grows_and_a_rewrite_shows(tmp_path):
    log = TransparencyLog(tmp_path / "log")
    manifests = [json.dumps({"release": i}).encode() for i in range(5)]
    for i, m in enumerate(manifests[:3]):
        assert log.append(m) == i
    pinned = log.published_checkpoint()
    assert pinned == Checkpoint(3, merkle.root([manifest_leaf(m) for m in manifests[:3]]))
    for m in manifests[3:]:
        log.append(m)
    now = log.published_checkpoint()
    assert log.index_of(manifests[4]) == 4 and log.index_of(b"never released") is None
    assert merkle.verify_inclusion(4, now.size, manifest_leaf(manifests[4]), log.inclusion_proof(4), now.root)
    assert merkle.verify_consistency(pinned.size, now.size, log.consistency_proof(pinned.size), pinned.root, now.root)
    # The operator rewrites history (drops release 1 and appends another): the pinned head no longer
    # fits whatever proof the rewritten log can give.
    lines = (tmp_path / "log" / "entries.jsonl").read_text().splitlines()
    (tmp_path / "log" / "entries.jsonl").write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    log.append(b"replacement")
    now = log.published_checkpoint()
    assert not merkle.verify_consistency(pinned.size, now.size, log.consistency_proof(pinned.size), pinned.root,
                                         now.root)
