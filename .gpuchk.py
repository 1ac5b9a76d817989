import sys,types,torch
p=types.ModuleType('mxfp8_moe');p.__path__=['mxfp8_moe'];sys.modules['mxfp8_moe']=p
from mxfp8_moe.layout import *
from mxfp8_moe.quantize import *
from mxfp8_moe.reference import reference_moe_gemm as ref
d='cuda';torch.manual_seed(0)
c=torch.arange(256).to(torch.uint8)
assert torch.equal(ue8m0_to_float(c.to(d)).cpu().view(torch.int32),ue8m0_to_float(c).view(torch.int32))
assert torch.equal(float_to_ue8m0(ue8m0_to_float(c.to(d))).cpu(),c)
mi=torch.tensor([0,0,5,6,6,20],dtype=torch.int32)
for kg in (32,128):
  x=torch.randn(20,2960)*torch.exp2(torch.randint(-20,20,(20,1)).float());w=torch.randn(5,200,2960)
  torch.cuda.set_sync_debug_mode("error")
  ag,sag=quantize_activations(x.to(d),mi.to(d),kg);bg,sbg=quantize_weights(w.to(d),kg,block_2d=True)
  dg=dequantize_activations(ag,sag,mi.to(d),kg);dw=dequantize_weights(bg,sbg,kg);r=token_scale_rows(mi.to(d),20)
  torch.cuda.set_sync_debug_mode(0)
  a,sa=quantize_activations(x,mi,kg);b,sb=quantize_weights(w,kg,block_2d=True)
  assert sag.stride()==sa.stride() and sbg.stride()==sb.stride()
  assert torch.equal(ag.cpu().view(torch.uint8),a.view(torch.uint8)) and torch.equal(sag.cpu(),sa)
  assert torch.equal(bg.cpu().view(torch.uint8),b.view(torch.uint8)) and torch.equal(sbg.cpu(),sb)
  assert torch.equal(dg.cpu(),dequantize_activations(a,sa,mi,kg)) and torch.equal(dw.cpu(),dequantize_weights(b,sb,kg))
  assert torch.equal(r.cpu(),token_scale_rows(mi,20))
  for g in (False,True):
    o=ref(ag,bg,sag,sbg,mi.to(d),k_granularity=kg,is_gated=g,accumulate_dtype=torch.float64).cpu()
    o2=ref(a,b,sa,sb,mi,k_granularity=kg,is_gated=g,accumulate_dtype=torch.float64)
    o3=ref(ag,bg,to_k_major(sag),to_k_major(sbg),mi.to(d),k_granularity=kg,is_gated=g).cpu().double()
    print(kg,g,((o-o2).norm()/o2.norm()).item(),((o3-o2).norm()/o2.norm()).item())
print("OK",torch.__version__,torch.cuda.get_device_name())
