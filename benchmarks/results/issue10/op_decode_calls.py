# multi_lora_add_ per call at W7 decode sizes (8 rows: 3 adapters x 2 + 2 base, r = 8, 1 thread):
# warm (the same stacks every call) and cold (64 layers of stacks, 64 MB streamed every 16
# calls, as the base GEMMs do between LoRA calls). usage: python .../op_decode_calls.py
import time, torch, sys
torch.set_num_threads(1)
import lora_ext
op = torch.ops.lora_ext.multi_lora_add_.default
R,N=8,4
big = torch.randn(16*1024*1024)  # 64 MB
sink = torch.empty_like(big)
for IN,OUT in ((576,576),(576,192),(576,1536),(1536,576)):
  # many layers' stacks so each call reads cold A/B
  L=64
  As=[torch.randn(N,R,IN) for _ in range(L)]; Bs=[torch.randn(N,OUT,R) for _ in range(L)]
  sc = torch.rand(N); rk = torch.full((N,), R, dtype=torch.int64)
  idx = torch.tensor([0,0,1,1,2,2,-1,-1], dtype=torch.int32)
  x = torch.randn(8, IN); y = torch.randn(8, OUT)
  for mode in ("warm","cold"):
    ts=[]
    for rep in range(5):
      for l in range(L):
        if mode=="cold" and l%16==0: sink.copy_(big)
        t0=time.perf_counter(); op(y,x,As[l] if mode=="cold" else As[0],Bs[l] if mode=="cold" else Bs[0],idx,sc,rk); ts.append(time.perf_counter()-t0)
    ts.sort()
    byts = 3*R*(IN+OUT)*4
    print(IN,OUT,mode,"median us",round(ts[len(ts)//2]*1e6,2),"bytes KB",byts/1024, "-> GB/s", round(byts/ts[len(ts)//2]/1e9,1))
