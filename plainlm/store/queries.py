"""Named SQL queries over the store: the ones docs/sql.md explains, runnable with
`plainlm store query --db URL NAME`. Each runs unchanged on SQLite and PostgreSQL; `?` is the
model id (or the trace run id for trace_* queries).

Decoding quantized blocks inside SQL would mean reimplementing every block format in SQL, so the
per-tensor and per-row statistics (mean_abs, rms, max_abs, l2_norm, zero_share) are computed from
the decoded weights when the model is stored, and the queries aggregate those.
"""
from __future__ import annotations

QUERIES: dict[str, tuple[str, str]] = {
    "layer_mean_abs": (
        "mean |w| of each layer's weight matrices (element-weighted; norm gains excluded)",
        """SELECT layer, SUM(mean_abs * n_elements) / SUM(n_elements) AS mean_abs,
                  SUM(n_elements) AS n_weights
           FROM tensors
           WHERE model_id = ? AND layer IS NOT NULL AND n_rows > 1 AND alias_of IS NULL
           GROUP BY layer ORDER BY layer"""),
    "kind_mean_abs": (
        "mean |w| and rms of each kind of matrix (attn_q, ffn_down, ...) over all layers",
        """SELECT kind, SUM(mean_abs * n_elements) / SUM(n_elements) AS mean_abs,
                  MAX(max_abs) AS max_abs, COUNT(*) AS n_tensors
           FROM tensors
           WHERE model_id = ? AND n_rows > 1 AND alias_of IS NULL
           GROUP BY kind ORDER BY kind"""),
    "zero_share": (
        "share of weights that decode to exactly 0, per quantization type and overall "
        "(about 1/3 to 1/2 in a ternary model, near 0 in Q4/Q8)",
        """SELECT qtype, SUM(zero_share * n_elements) / SUM(n_elements) AS zero_share,
                  SUM(n_elements) AS n_weights
           FROM tensors
           WHERE model_id = ? AND n_rows > 1 AND alias_of IS NULL
           GROUP BY qtype
           UNION ALL
           SELECT 'all', SUM(zero_share * n_elements) / SUM(n_elements), SUM(n_elements)
           FROM tensors
           WHERE model_id = ? AND n_rows > 1 AND alias_of IS NULL
           ORDER BY 1"""),
    "largest_embeddings": (
        "the 20 tokens whose embedding rows have the largest L2 norm",
        """SELECT r.row AS token_id, v.text, r.l2_norm, r.max_abs
           FROM row_stats r JOIN vocab v ON v.model_id = r.model_id AND v.token_id = r.row
           WHERE r.model_id = ? AND r.tensor = 'token_embd'
           ORDER BY r.l2_norm DESC, r.row LIMIT 20"""),
    "outlier_rows": (
        "the 20 matrix rows (output units) with the largest single weight",
        """SELECT tensor, row, max_abs, mean_abs
           FROM row_stats
           WHERE model_id = ? AND tensor <> 'token_embd'
           ORDER BY max_abs DESC, tensor, row LIMIT 20"""),
    "storage": (
        "tensors and bytes per quantization type",
        """SELECT qtype, COUNT(*) AS n_tensors, SUM(n_elements) AS n_weights,
                  SUM(n_rows * row_bytes) AS bytes,
                  8.0 * SUM(n_rows * row_bytes) / SUM(n_elements) AS bits_per_weight
           FROM tensors WHERE model_id = ? AND alias_of IS NULL
           GROUP BY qtype ORDER BY bytes DESC"""),
    "trace_top": (
        "trace: for each position and layer, the most attended key position (any head)",
        """SELECT a.position, a.layer, a.head, a.key_pos, k.text AS key_text, a.weight
           FROM attention a
           JOIN trace_tokens k ON k.run_id = a.run_id AND k.position = a.key_pos
           WHERE a.run_id = ? AND a.weight = (
               SELECT MAX(b.weight) FROM attention b
               WHERE b.run_id = a.run_id AND b.position = a.position AND b.layer = a.layer)
           ORDER BY a.position, a.layer, a.head"""),
    "trace_previous_token_heads": (
        "trace: heads whose mean weight on the previous token is highest",
        """SELECT layer, head, SUM(weight) / (SELECT COUNT(*) - 1 FROM trace_tokens t WHERE t.run_id = ?)
                  AS mean_prev_weight
           FROM attention
           WHERE run_id = ? AND key_pos = position - 1
           GROUP BY layer, head ORDER BY mean_prev_weight DESC, layer, head LIMIT 10"""),
}


def run_named(db, name: str, ident: int):
    """(columns, rows) of a named query for model (or trace run) `ident`."""
    if name not in QUERIES:
        raise KeyError(name)
    sql = QUERIES[name][1]
    return db.query(db._sql(sql), (ident,) * sql.count("?"))
