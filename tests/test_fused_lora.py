"""The fused LoRA function (job/fused_lora.py) computes what peft's LoRA layer computes: outputs and gradients
(of the input, lora_A and lora_B) on the tiny Llama's layers, with a 4-bit (bitsandbytes NF4) and a 16/32-bit
base, with and without dropout under a fixed seed (the same masks), the dropout stored or drawn again, in fp32
and in bf16 under autocast; a whole model's loss and gradients; and the layers it must leave to peft. On a
machine with CUDA the same cases run on the GPU too. Its speed is measured on a GPU (docs/benchmarks.md)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from job.config import load_config
from job.fused_lora import FusedLoraMixin, base_in_function, choose_fused_lora, fuse_lora_layers

KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASES = ["nf4-in-function", "nf4-own-node", "fp32"]
# The 4-bit base computes in bf16 (bnb_4bit_compute_dtype), so it runs under bf16 autocast only, as in training.
BASE_DTYPES = [pytest.param(base, dtype, id=f"{base}-{name}") for base in BASES
               for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16-autocast"))
               if dtype == torch.bfloat16 or not base.startswith("nf4")]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# bf16 under autocast: peft rounds lora_B's output, its scaled copy and the sum to bf16 separately, the fused
# addmm once; the difference is a few bf16 steps of the values (8 bits of mantissa: 2**-8 = 0.4%).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2}


def peft_model(model_dir, four_bit: bool, device: str, dropout: float, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(0)
    kwargs = {"dtype": torch.float32}
    if four_bit:
        kwargs = {"dtype": torch.bfloat16, "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_quant_storage=torch.bfloat16), "device_map": {"": device}}
    base = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=KINDS,
                                            task_type="CAUSAL_LM", **lora)).to(device)
    for name, param in model.named_parameters():  # lora_B starts at zero: make the adapter's effect visible
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return model.train()


def unfuse(model) -> None:
    for module in model.modules():
        if isinstance(module, FusedLoraMixin):
            module.__class__ = next(c for c in type(module).__mro__[1:] if not issubclass(c, FusedLoraMixin))


def model_cache(model_dir):
    """get(four_bit, device): a peft model on the tiny Llama, built once, handed out with peft's own layers.
    (A function, not only a fixture: bench/gpu_fused_lora_check.py runs these tests on a GPU without pytest's
    conftest, whose S3 servers the GPU machine cannot install.)"""
    built = {}

    def get(four_bit: bool, device: str):
        if (four_bit, device) not in built:
            built[four_bit, device] = peft_model(model_dir, four_bit, device, 0.1)
        unfuse(built[four_bit, device])
        return built[four_bit, device]

    return get


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    return model_cache(tiny_model_dir)


def layer_case(layer, x, seed: int, dtype, device: str):
    """The layer's output, the input's gradient, each LoRA weight's gradient and the generator's next draw."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    autocast = torch.autocast(device, dtype=torch.bfloat16) if dtype == torch.bfloat16 else contextlib.nullcontext()
    with autocast:
        out = layer(x)
    between = torch.rand(3, device=device)  # a draw between the passes: the recomputed dropout must not repeat it
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out)
    (out.float() * weights.float()).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in layer.named_parameters() if p.requires_grad}
    return out.detach().float(), x.grad.detach().float(), grads, torch.cat([between, torch.rand(4, device=device)])


def assert_close(a, b, tolerance, what):
    scale = max(a.abs().max().item(), 1e-12)
    worst = (a.float() - b.float()).abs().max().item()
    assert worst <= tolerance * scale, f"{what}: differs by {worst} ({worst / scale:.2e} of its largest value)"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("base,dtype", BASE_DTYPES)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("recompute", [False, True], ids=["stored", "recomputed"])
def test_layer_equals_peft(models, device, base, dtype, dropout, recompute):
    """base: a 4-bit base computed inside the fused function (the default) or as its own autograd node, or an
    fp32 nn.Linear base (always its own node)."""
    four_bit = base.startswith("nf4")
    model = models(four_bit, device)
    for kind, layer in [("q_proj", model.base_model.model.model.layers[0].self_attn.q_proj),
                        ("down_proj", model.base_model.model.model.layers[1].mlp.down_proj)]:
        layer.lora_dropout["default"].p = dropout if dropout else 0.1
        if not dropout:
            layer.lora_dropout["default"].eval()  # nn.Dropout in eval mode: what peft does with p=0 (Identity)
        try:
            base_dtype = torch.bfloat16 if four_bit else torch.float32
            x = torch.randn(2, 9, layer.in_features, generator=torch.Generator().manual_seed(3)).to(device, base_dtype)
            layer.enable_adapters(False)
            base_only = layer_case(layer, x, seed=11, dtype=dtype, device=device)  # peft's base layer alone
            layer.enable_adapters(True)
            expected = layer_case(layer, x, seed=11, dtype=dtype, device=device)
            fuse_lora_layers(layer, recompute_dropout=recompute)
            assert isinstance(layer, FusedLoraMixin)
            layer.fused_with_base = base == "nf4-in-function"
            assert base_in_function(layer.base_layer) is four_bit
            got = layer_case(layer, x, seed=11, dtype=dtype, device=device)
            unfuse(layer)
        finally:
            layer.lora_dropout["default"].train()
        tolerance = TOLERANCE[dtype]
        assert_close(expected[0], got[0], tolerance, f"{kind} output")
        assert_close(expected[1], got[1], tolerance, f"{kind} input gradient")
        # the LoRA's own share of both, on its own scale (the base's share is much larger)
        assert_close(expected[0] - base_only[0], got[0] - base_only[0], tolerance, f"{kind} output's LoRA part")
        assert_close(expected[1] - base_only[1], got[1] - base_only[1], tolerance, f"{kind} input gradient's LoRA part")
        assert sorted(expected[2]) == sorted(got[2]) == ["lora_A.default.weight", "lora_B.default.weight"]
        for name in expected[2]:
            assert got[2][name].dtype == expected[2][name].dtype
            assert_close(expected[2][name], got[2][name], tolerance, f"{kind} {name} gradient")
        # the same random draws were used, and the generator left where peft leaves it
        assert torch.equal(expected[3], got[3])


def kept_for_backward(layer, x, device: str) -> tuple[int, bool]:
    """(bytes of the tensors autograd keeps for the layer's backward pass, each storage once, parameters aside;
    whether the input itself is among them)."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    x = x.detach().clone().requires_grad_(True)
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast(device, dtype=torch.bfloat16):
            layer(x)
    return sum(kept.values()), x.untyped_storage().data_ptr() in kept


@pytest.mark.parametrize("device", DEVICES)
def test_keeps_no_more_than_peft(models, device):
    """With the dropout stored, what peft keeps: the dropped input and the mask, not the input as well (the input
    of q/k/v is freed after the forward pass otherwise; keeping it ran a 7B out of memory on an H100 at the
    planner's batch). Drawn again: only the input, at least a byte an input value less than peft."""
    layer = models(True, device).base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(4, 64, layer.in_features, generator=torch.Generator().manual_seed(2)).to(device, torch.bfloat16)
    peft, peft_keeps_x = kept_for_backward(layer, x, device)
    fuse_lora_layers(layer, recompute_dropout=False)
    stored, stored_keeps_x = kept_for_backward(layer, x, device)
    fuse_lora_layers(layer, recompute_dropout=True)
    recomputed, recomputed_keeps_x = kept_for_backward(layer, x, device)
    assert not peft_keeps_x and not stored_keeps_x and recomputed_keeps_x
    assert stored <= peft, (stored, peft)
    assert recomputed <= peft - x.numel(), (recomputed, peft)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_is_applied_and_drawn_from_the_seed(models, device):
    layer = models(False, device).base_model.model.model.layers[0].mlp.up_proj
    x = torch.randn(3, 7, layer.in_features, generator=torch.Generator().manual_seed(1)).to(device)
    fuse_lora_layers(layer, recompute_dropout=True)
    first, again, other = (layer_case(layer, x, seed, torch.float32, device) for seed in (4, 4, 5))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])  # another seed, other masks
    layer.eval()
    with torch.no_grad():  # evaluation: no dropout, the same output every time
        assert torch.equal(layer(x), layer(x))
    layer.train()


@pytest.mark.parametrize("device", DEVICES)
def test_whole_model_loss_and_gradients(models, device):
    model = models(True, device)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(7)).to(device)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(2)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach().float(), grads, torch.rand(4, device=device)

    loss, grads, next_draw = loss_and_grads()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert fuse_lora_layers(model, recompute_dropout=True) == len(KINDS) * model.config.num_hidden_layers
    fused_loss, fused_grads, fused_next_draw = loss_and_grads()
    assert torch.equal(fused_next_draw, next_draw)  # the generator is left where peft leaves it
    assert fused_loss.item() == pytest.approx(loss.item(), rel=1e-2)
    assert sorted(grads) == sorted(fused_grads)
    for name in grads:
        assert_close(grads[name], fused_grads[name], 5e-2, name)
    # the parameters keep their names and values: checkpoints and the saved adapter are as before
    assert list(state) == list(model.state_dict())


def test_layers_it_does_not_cover_run_peft(tiny_model_dir):
    """DoRA, a disabled or merged adapter: peft's own forward, exactly."""
    model = peft_model(tiny_model_dir, False, "cpu", 0.0, use_dora=True)
    ids = torch.arange(20).unsqueeze(0)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        fuse_lora_layers(model, recompute_dropout=False)
        assert torch.equal(model(input_ids=ids).logits, expected)
    plain = peft_model(tiny_model_dir, False, "cpu", 0.0)
    with torch.no_grad():
        with plain.disable_adapter():
            base = plain(input_ids=ids).logits
        fuse_lora_layers(plain, recompute_dropout=False)
        with plain.disable_adapter():
            assert torch.equal(plain(input_ids=ids).logits, base)
        adapted = plain(input_ids=ids).logits
        assert not torch.equal(adapted, base)
        plain.base_model.merge_adapter()
        assert torch.allclose(plain(input_ids=ids).logits, adapted, atol=1e-5)


def test_choice_and_its_reason():
    def cfg(*sets):
        return load_config(None, ("run_uri=/r", "data.uri=d.csv", "model.uri=/m", *sets), environ={})

    assert cfg().train.fused_lora == "auto"
    assert choose_fused_lora(cfg("train.fused_lora=false")) == (False, "off (train.fused_lora: false)")
    assert choose_fused_lora(cfg("train.fused_lora=true")) == (True, "train.fused_lora: true")
    expected = (True, "auto: CUDA") if torch.cuda.is_available() else (
        False, "auto: not used, no CUDA device (measured and made the default on GPUs only)")
    assert choose_fused_lora(cfg()) == expected
