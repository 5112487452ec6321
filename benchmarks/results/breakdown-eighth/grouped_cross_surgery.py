"""One-off experiment (eighth round, kept with its output grouped_cross_time.txt; not part of `python -m benchmarks`):
rewrite a decoder.onnx so cross-attention runs per sentence (memory (B_s, nh, S, hs), queries grouped
by row_slot into (B_s, K, H)); time 20 steps at 32 sentences x beam 4 against the original.

    python grouped_cross_surgery.py /tmp/seqserve-bench/translate_repository/marian-small-int8/1/decoder.onnx
        # writes /tmp/p8/marian-small-int8/1/decoder.grouped.onnx; then grouped_cross_time.py marian-small-int8
"""
import sys, time, numpy as np, onnx, onnxruntime as ort
from onnx import helper, TensorProto as TP
sys.path.insert(0, '/work/main')
from benchmarks.common import session_options
src = sys.argv[1]
m = onnx.load(src)
g = m.graph
prod = {o: n for n in g.node for o in n.output}
new_nodes = []
extra_inputs = [helper.make_tensor_value_info('row_slot', TP.INT64, ['batch']),
                helper.make_tensor_value_info('slots', TP.INT64, [1])]
# shapes: sentences from cross_key_0
pre = [helper.make_node('Shape', ['cross_key_0'], ['g_ck_shape']),
       helper.make_node('Slice', ['g_ck_shape', 'g_zero', 'g_one'], ['g_sent']),  # [B_s]
       helper.make_node('Mul', ['g_sent', 'slots'], ['g_total']),
       ]
inits = [onnx.numpy_helper.from_array(np.array([0], np.int64), 'g_zero'), onnx.numpy_helper.from_array(np.array([1], np.int64), 'g_one'),
         onnx.numpy_helper.from_array(np.array([-1], np.int64), 'g_minus1')]
hidden = None
for n in g.node:
    if n.op_type == 'MultiHeadAttention' and 'cross_attn' in n.name:
        q, k, v, _, _, bias = n.input
        t = n.name.replace('/', '_')
        hidden = hidden or 0
        new_nodes += [
            helper.make_node('Shape', [q], [t + 'qs']),  # (R, 1, H)
            helper.make_node('Slice', [t + 'qs', 'g_minus1', 'g_big'], [t + 'H']),
            helper.make_node('Concat', ['g_total', t + 'H'], [t + 'zshape'], axis=0),
            helper.make_node('ConstantOfShape', [t + 'zshape'], [t + 'zeros'], value=helper.make_tensor('v', TP.FLOAT, [1], [0.0])),
            helper.make_node('Reshape', [q, t + 'RH'], [t + 'q2']),  # (R, H)
            helper.make_node('Unsqueeze', ['row_slot', 'g_one'], [t + 'idx']),  # (R, 1)
            helper.make_node('ScatterND', [t + 'zeros', t + 'idx', t + 'q2'], [t + 'qs_flat']),
            helper.make_node('Concat', ['g_sent', 'slots', t + 'H'], [t + 'gshape'], axis=0),
            helper.make_node('Reshape', [t + 'qs_flat', t + 'gshape'], [t + 'qg']),
            helper.make_node('Shape', [bias], [t + 'bs']),
            helper.make_node('Concat', ['g_sent', 'g_one', 'slots', t + 'Tdim'], [t + 'bshape'], axis=0),
            helper.make_node('Slice', [t + 'bs', 'g_minus1', 'g_big'], [t + 'Tdim']),
            helper.make_node('Expand', [bias, t + 'bshape'], [t + 'bg']),
            helper.make_node('MultiHeadAttention', [t + 'qg', k, v, '', '', t + 'bg'], [t + 'og'], name=n.name, domain='com.microsoft',
                             **{a.name: helper.get_attribute_value(a) for a in n.attribute}),
            helper.make_node('Reshape', [t + 'og', t + 'RH'], [t + 'oflat']),
            helper.make_node('Gather', [t + 'oflat', 'row_slot'], [t + 'orows'], axis=0),
            helper.make_node('Unsqueeze', [t + 'orows', 'g_one'], [n.output[0]]),
        ]
    else:
        new_nodes.append(n)
inits += [onnx.numpy_helper.from_array(np.array([2**62], np.int64), 'g_big')]
for n in g.node:
    pass
# per-node RH constants: (-1, H)
H = None
for i in g.input:
    if i.name == 'cross_key_0':
        dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
        H = dims[1] * dims[3]
for n in new_nodes:
    for j, x in enumerate(n.input):
        if x.endswith('RH') and not any(t.name == x for t in inits):
            inits.append(onnx.numpy_helper.from_array(np.array([-1, H], np.int64), x))
del g.node[:]
g.node.extend(pre + new_nodes)
g.initializer.extend(inits)
g.input.extend(extra_inputs)
onnx.checker.check_model(m) if False else None
# topological sort (Slice for Tdim placed after use)
order, done, avail = [], set(), {i.name for i in g.input} | {i.name for i in g.initializer} | {''}
nodes = list(g.node)
while nodes:
    rest = []
    for n in nodes:
        if all(x in avail for x in n.input):
            order.append(n); avail |= set(n.output)
        else:
            rest.append(n)
    assert len(rest) < len(nodes), [r.name for r in rest][:5]
    nodes = rest
del g.node[:]; g.node.extend(order)
out = src.replace('.onnx', '.grouped.onnx').replace('/tmp/seqserve-bench/translate_repository/', '/tmp/p8/')
import os; os.makedirs(os.path.dirname(out), exist_ok=True)
onnx.save(m, out)
print(out)
