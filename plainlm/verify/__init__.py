"""Verification: plainlm next to outside references and proofs about its integer arithmetic.

    reference.py   `plainlm verify --against transformers`: stage-by-stage differences
    proofs.py      `plainlm verify proofs`: z3 proofs (bit-plane ternary dot, int32 overflow,
                   fixed-point exp/softmax error bound)
"""
