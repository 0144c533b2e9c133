"""Each proof of plainlm.verify.proofs is a test (z3, or exhaustive enumeration where stated)."""
from __future__ import annotations

import pytest

pytest.importorskip("z3")

from plainlm.verify import proofs  # noqa: E402


@pytest.mark.parametrize("proof", proofs.PROOFS, ids=lambda p: p.__name__)
def test_proof(proof):
    r = proof()
    assert r["proved"], f"{r['name']}: {r['detail']}"


def test_a_false_claim_is_refuted():
    """The machinery finds counterexamples: int16 lanes with x = -128 allowed *do* overflow."""
    import z3
    lane, x = z3.BitVec("lane", 16), z3.BitVec("x", 16)
    ok, detail = proofs._unsat(lane == -128 * 255, x == -128, z3.SignExt(16, lane - x) != z3.SignExt(16, lane) - z3.SignExt(16, x))
    assert ok          # 255 words of +128 still fit ...
    ok, detail = proofs._unsat(lane == 128 * 255, x == -128, z3.SignExt(16, lane - x) != z3.SignExt(16, lane) - z3.SignExt(16, x))
    assert not ok and "counterexample" in detail     # ... the 256th (+128) wraps: why |x| <= 127 matters


def test_cli(capsys):
    from plainlm.cli import main
    assert main(["verify", "proofs", "--only", "planes_from_codes"]) == 0
    out = capsys.readouterr().out
    assert "[PROVED] planes_from_codes_disjoint" in out and out.strip().endswith("1/1 proved")
