"""Independent int4 packers (AutoAWQ, auto-gptq) used as oracles by the quantization tests."""
import importlib
import importlib.util
import sys
import types

import torch


def import_bypassing_package_init(package: str, submodule: str):
    """Import package.submodule without running package/__init__.py (it pulls in broken dependencies)."""
    if package not in sys.modules or not hasattr(sys.modules[package], "__path__"):
        spec = importlib.util.find_spec(package)
        if spec is None:
            return None
        bare = types.ModuleType(package)
        bare.__path__ = list(spec.submodule_search_locations)
        sys.modules[package] = bare
    return importlib.import_module(f"{package}.{submodule}")


def awq_checkpoint(awq_gemm_module, w, weights, group_size):
    """Pack W with AutoAWQ; return the tensors a checkpoint would hold."""
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data = w.clone()
    if group_size == -1:  # from_linear indexes groups with idx // group_size; the config keeps -1
        group_size = w.shape[1]
    packed = awq_gemm_module.WQLinear_GEMM.from_linear(
        linear, 4, group_size, scales=weights.scales.float(), zeros=weights.zeros.float())
    return {"qweight": packed.qweight, "qzeros": packed.qzeros, "scales": packed.scales}


def gptq_v1_checkpoint(autogptq_module, w, weights, group_size):
    """Pack W with auto-gptq (v1: stored zero = zero - 1); scales / zeros go in as [out, groups]."""
    out_features, in_features = w.shape
    layer = autogptq_module.QuantLinear(4, group_size, in_features, out_features, bias=False)
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    linear.weight.data = w.clone()
    layer.pack(linear, weights.scales.t().float(), weights.zeros.t().float(), weights.g_idx.to(torch.int32))
    return {"qweight": layer.qweight, "qzeros": layer.qzeros, "scales": layer.scales.half(),
            "g_idx": layer.g_idx.to(torch.int32)}


def gptq_v2_checkpoint(w, weights, group_size, sym):
    """Pack W with GPTQModel's torch QuantLinear, whose packer writes GPTQ v2 (true zeros; GPTQModel subtracts one
    from every zero only when it saves a v1 checkpoint); scales / zeros go in as [out, groups]."""
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    out_features, in_features = w.shape
    layer = TorchLinear(bits=4, group_size=in_features if group_size == -1 else group_size, sym=sym,
                        desc_act=not torch.equal(weights.g_idx, weights.g_idx.sort().values),
                        in_features=in_features, out_features=out_features, bias=False)
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    linear.weight.data = w.clone()
    layer.pack_block(linear, weights.scales.t().float(), weights.zeros.t().float(), weights.g_idx.to(torch.int32))
    return {"qweight": layer.qweight, "qzeros": layer.qzeros, "scales": layer.scales.half(),
            "g_idx": layer.g_idx.to(torch.int32)}
