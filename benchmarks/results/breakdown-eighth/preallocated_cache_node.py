"""One-off (eighth round): one self-attention sublayer at MarianMT small's sizes, the exported form (Reshape, Transpose,
Concat onto the caches + MultiHeadAttention) against com.microsoft GroupQueryAttention, plain and with the caches
preallocated (64 positions) and bound as both past input and present output. Output: preallocated_cache_node.txt."""
import numpy as np, onnxruntime as ort, time
from onnx import helper, TensorProto as TP
N, Hs = 4, 64; D = N * Hs
def sess(nodes, ins, outs):
    g = helper.make_graph(nodes, 'g', ins, outs)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid('', 17), helper.make_opsetid('com.microsoft', 1)]); m.ir_version = 8
    so = ort.SessionOptions(); so.intra_op_num_threads = 2
    return ort.InferenceSession(m.SerializeToString(), so, providers=['CPUExecutionProvider'])
f = lambda n, s: helper.make_tensor_value_info(n, TP.FLOAT, s)
i32 = lambda n, s: helper.make_tensor_value_info(n, TP.INT32, s)
# GQA: new k, v (B,1,D); past (B,N,P,Hs)
gqa = sess([helper.make_node('GroupQueryAttention', ['q', 'k', 'v', 'pk', 'pv', 'seqlens', 'total'], ['o', 'nk', 'nv'],
                             domain='com.microsoft', num_heads=N, kv_num_heads=N, scale=0.125)],
           [f('q', ['b', 1, D]), f('k', ['b', 1, D]), f('v', ['b', 1, D]), f('pk', ['b', N, 'p', Hs]), f('pv', ['b', N, 'p', Hs]),
            i32('seqlens', ['b']), i32('total', [])], [f('o', None), f('nk', None), f('nv', None)])
# exported: reshape/transpose/concat + MHA with bias
shape = helper.make_tensor('shp', TP.INT64, [4], [0, 1, N, Hs])
nodes = [helper.make_node('Constant', [], ['shape'], value=shape)]
for x in 'kv':
    nodes += [helper.make_node('Reshape', [x, 'shape'], [x + 'r']), helper.make_node('Transpose', [x + 'r'], [x + 't'], perm=[0, 2, 1, 3]),
              helper.make_node('Concat', ['p' + x, x + 't'], ['n' + x], axis=2)]
nodes.append(helper.make_node('MultiHeadAttention', ['q', 'nk', 'nv', '', '', 'bias'], ['o'], domain='com.microsoft', num_heads=N, scale=0.125))
mha = sess(nodes, [f('q', ['b', 1, D]), f('k', ['b', 1, D]), f('v', ['b', 1, D]), f('pk', ['b', N, 'p', Hs]), f('pv', ['b', N, 'p', Hs]),
                   f('bias', ['b', 1, 1, 'p1'])], [f('o', None), f('nk', None), f('nv', None)])
def t(s, feeds, n=300):
    for _ in range(20): s.run(None, feeds)
    ts = []
    for _ in range(n):
        a = time.perf_counter(); s.run(None, feeds); ts.append(time.perf_counter() - a)
    return np.median(ts) * 1e6
r = np.random.default_rng(0)
for B in (1, 32, 128):
    for P in (10, 19):
        q, k, v = (r.standard_normal((B, 1, D), np.float32) for _ in range(3))
        pk, pv = (r.standard_normal((B, N, P, Hs), np.float32) for _ in range(2))
        fm = {'q': q, 'k': k, 'v': v, 'pk': pk, 'pv': pv, 'bias': np.zeros((B, 1, 1, P + 1), np.float32)}
        fg = {'q': q, 'k': k, 'v': v, 'pk': pk, 'pv': pv, 'seqlens': np.full((B,), P, np.int32), 'total': np.array(P + 1, np.int32)}
        om, og = mha.run(None, fm), gqa.run(None, fg)
        err = max(float(np.abs(a - b).max()) for a, b in zip(om, og))
        print(f'B {B} P {P}: exported+MHA {t(mha, fm):.0f} us, GQA {t(gqa, fg):.0f} us, max diff {err:.2e}, shapes {og[1].shape}')
print('--- rerun + shared buffer')
for B in (1, 32, 128):
    for P in (10, 19):
        q, k, v = (r.standard_normal((B, 1, D), np.float32) for _ in range(3))
        pk, pv = (r.standard_normal((B, N, P, Hs), np.float32) for _ in range(2))
        fm = {'q': q, 'k': k, 'v': v, 'pk': pk, 'pv': pv, 'bias': np.zeros((B, 1, 1, P + 1), np.float32)}
        fg = {'q': q, 'k': k, 'v': v, 'pk': pk, 'pv': pv, 'seqlens': np.full((B,), P, np.int32), 'total': np.array(P + 1, np.int32)}
        # shared: buffer of 64 positions
        M = 64
        bk = np.zeros((B, N, M, Hs), np.float32); bk[:, :, :P] = pk
        bv = np.zeros((B, N, M, Hs), np.float32); bv[:, :, :P] = pv
        ok, ov = ort.OrtValue.ortvalue_from_numpy(bk), ort.OrtValue.ortvalue_from_numpy(bv)
        bind = gqa.io_binding()
        for n, x in (('q', q), ('k', k), ('v', v), ('seqlens', fg['seqlens']), ('total', fg['total'])):
            bind.bind_cpu_input(n, x)
        bind.bind_ortvalue_input('pk', ok); bind.bind_ortvalue_input('pv', ov)
        bind.bind_output('o'); bind.bind_ortvalue_output('nk', ok); bind.bind_ortvalue_output('nv', ov)
        gqa.run_with_iobinding(bind)
        o_shared = bind.copy_outputs_to_cpu()[0]
        og = gqa.run(None, fg)
        err = float(np.abs(o_shared - og[0]).max())
        newk = ok.numpy()[:, :, P]
        print(f'B {B} P {P}: exported+MHA {t(mha, fm, 1000):.0f} us, GQA {t(gqa, fg, 1000):.0f} us; shared-buffer diff {err:.2e}, new key written at P: {np.allclose(newk, og[1][:, :, P])}')
        def shared_run():
            gqa.run_with_iobinding(bind)
        for _ in range(20): shared_run()
        ts = []
        for _ in range(1000):
            a = time.perf_counter(); shared_run(); ts.append(time.perf_counter() - a)
        print('   shared-buffer GQA %.0f us' % (np.median(ts) * 1e6))
