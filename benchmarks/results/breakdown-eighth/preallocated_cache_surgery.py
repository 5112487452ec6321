"""One-off experiment (eighth round, kept with preallocated_cache_time.py and its output; not part of
`python -m benchmarks`). Rewrite a Transformer decoder.onnx's self-attention as com.microsoft GroupQueryAttention over the caches
(past_key/past_value inputs, present outputs; new inputs seqlens_k (B,) int32 and total_sequence_length int32).

    python preallocated_cache_surgery.py /tmp/seqserve-bench/translate_repository/marian-small/1/decoder.onnx \
        /tmp/p8/marian-small/1/decoder.gqa.onnx
"""
import sys, numpy as np, onnx
from onnx import helper, TensorProto as TP
src, out = sys.argv[1], sys.argv[2]
m = onnx.load(src)
g = m.graph
prod = {o: n for n in g.node for o in n.output}
drop = set()
new = []
for n in g.node:
    if n.op_type == 'MultiHeadAttention' and 'self_attn' in n.name:
        q, k_cat, v_cat = n.input[:3]
        heads = [a for a in n.attribute if a.name == 'num_heads'][0].i
        scale = [a for a in n.attribute if a.name == 'scale'][0].f
        srcs = []
        for cat in (k_cat, v_cat):
            c = prod[cat]; past, t = c.input; tr = prod[t]; rs = prod[tr.input[0]]
            drop.update([c.name, tr.name, rs.name]); srcs.append((past, rs.input[0]))
        (pk, k), (pv, v) = srcs
        new.append((n.name, helper.make_node('GroupQueryAttention', [q, k, v, pk, pv, 'seqlens_k', 'total_sequence_length'],
                                             [n.output[0], k_cat, v_cat], name=n.name, domain='com.microsoft',
                                             num_heads=heads, kv_num_heads=heads, scale=scale)))
repl = dict(new)
nodes = [repl.get(n.name, n) for n in g.node if n.name not in drop]
del g.node[:]; g.node.extend(nodes)
g.input.extend([helper.make_tensor_value_info('seqlens_k', TP.INT32, ['batch']),
                helper.make_tensor_value_info('total_sequence_length', TP.INT32, [])])
onnx.save(m, out)
print(out, len(g.node), 'nodes')
