"""lensdyn off the CPU: captures stay on the model's device until reduced, and only reduced arrays leave it.

Two kinds of test. Without a GPU, ``tests/fake_device.py`` stands in for one: a model "on" it runs on
the CPU but every torch call is held to CUDA's device rules (a device tensor mixed with a CPU one, or
read as numpy, is refused), so the capture, the default analyses and the corpus run are checked for
device mistakes here, and for numbers equal to the plain CPU run's (the arithmetic is the CPU's).
With a CUDA device, the same runs on the real one must agree with the CPU to float32 round-off.
"""
import json
import re

import numpy as np
import pytest
import torch

import lensdyn as ld
from conftest import tiny_checkpoint
from fake_device import DeviceMixError, FakeDevice, fake_device_model, on_fake_device
from lensdyn.analyses import registry
from lensdyn.analyses.curvature import EditPair
from lensdyn.app.corpus import run_corpus
from lensdyn.errors import ArgumentError
from lensdyn.hooks.capture import resolve_store_device
from lensdyn.ops import to_numpy
from lensdyn.streaming import _flatten

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device on this machine: the GPU paths were not run")

# Word-tokenizer prompts for the tiny Llama (its vocabulary is w3..w100), of three lengths.
PROMPTS = [" ".join(f"w{3 + (7 * i + j) % 90}" for j in range(12 + i)) for i in range(3)]
# Curvature's edit pairs in that vocabulary: one meaning edit, one control.
PAIRS = (EditPair("a", "meaning", "w3 w4 w5 w6 w7 w8", "w3 w9 w5 w6 w7 w8", " w10", " w11"),
         EditPair("b", "control", "w3 w4 w5 w6 w7 w8", "w3 w4 w12 w6 w7 w8", " w10", " w10"))


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    """A tiny Llama checkpoint (as conftest's tiny_llama) with room for metastability's 128-token repeated prompt."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=160)
    return tiny_checkpoint(tmp_path_factory.mktemp("llama"), config, LlamaForCausalLM)


def small(analysis: registry.Analysis, model) -> dict:
    keywords = analysis.keywords(model=model, control=None, seed=0)
    return keywords | {"expansion": {"n_permutations": 5}, "curvature": {"n_draws": 5, "pairs": PAIRS}}.get(analysis.name, {})


def undated(result) -> str:
    """A result's plain data but its creation times (a nested result has its own)."""
    return re.sub(r'"created": "[^"]*"', "", json.dumps(result.to_dict(), sort_keys=True))


# --- what runs everywhere -----------------------------------------------------------------


def test_to_numpy_reads_a_cpu_tensor_without_a_copy_and_one_that_requires_grad():
    x = torch.arange(4.0)
    out = to_numpy(x)
    assert out.tolist() == [0.0, 1.0, 2.0, 3.0] and np.shares_memory(out, x.numpy())
    assert to_numpy(torch.ones(2, requires_grad=True)).tolist() == [1.0, 1.0]  # .numpy() refuses this one


def test_store_device_auto_is_the_models_device_and_the_cpu_for_offloaded_weights():
    assert resolve_store_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert resolve_store_device(torch.nn.Linear(2, 2, device="meta")) == torch.device("cpu")  # weights on disk
    assert resolve_store_device(torch.nn.Linear(2, 2), "cuda:1") == torch.device("cuda", 1)  # as given
    assert resolve_store_device(fake_device_model(torch.nn.Linear(2, 2))) == torch.device("cuda", 0)
    with pytest.raises(ArgumentError, match="not a torch device"):
        resolve_store_device(torch.nn.Linear(2, 2), "gpu")


def test_the_fake_device_refuses_what_cuda_refuses():
    """Known answers for the stand-in itself: each line is what a CUDA tensor ``x`` does."""
    x, cpu = on_fake_device(torch.arange(6.0)), torch.arange(6.0)
    with FakeDevice() as mode:
        with pytest.raises(DeviceMixError):
            x + cpu                                      # two devices in one op
        with pytest.raises(DeviceMixError):
            x.numpy()
        with pytest.raises(DeviceMixError):
            np.asarray(x * 2)
        with pytest.raises(DeviceMixError):
            cpu[on_fake_device(torch.tensor([0, 1]))]   # a CPU tensor indexed on the device
        assert (x + torch.tensor(1.0)).device.type == "cuda"      # a CPU scalar is fine
        assert x[cpu > 2].tolist() == [3.0, 4.0, 5.0]             # so is a CPU index
        assert torch.zeros(2, device=x.device).device == x.device
        assert (cpu.to(x.device) + x).device == x.device
        assert x.sum().cpu().numpy() == 15.0                      # moved first: fine
        assert float(x.sum()) == 15.0
        assert x[x > 2].shape == (3,)                             # its size is known once the mask is read
    assert mode.syncs == 3  # the .tolist(), the float() and the device mask: each a host sync on a GPU


def test_a_capture_on_the_device_stays_there_equals_the_cpu_one_and_syncs_per_batch_not_per_token(tiny_model):
    tokens = torch.randint(0, tiny_model.cfg.d_vocab, (3, 24), generator=torch.Generator().manual_seed(0))
    cpu = ld.capture(tiny_model, tokens, exclude=("first", "massive"))
    model = fake_device_model(tiny_model)
    syncs = {}
    for length in (8, 24):  # one batch either way; 3x the tokens
        with FakeDevice() as mode:
            cap = ld.capture(model, tokens[:, :length], exclude=("first", "massive"))
        syncs[length] = mode.syncs
    assert syncs[8] == syncs[24]
    for stream, value in cap.packed.items():
        assert value.device.type == "cuda", stream
        assert torch.equal(value.as_subclass(torch.Tensor), cpu.packed[stream]), stream
    assert torch.equal(cap.mask, cpu.mask) and cap.massive_positions == cpu.massive_positions
    with FakeDevice():
        on_cpu = ld.capture(model, tokens, store_device="cpu")
    assert on_cpu.packed["resid"].device.type == "cpu"


def test_a_cache_from_the_device_is_checked_against_the_models_own_pass(tiny_model):
    tokens = torch.randint(0, tiny_model.cfg.d_vocab, (2, 10), generator=torch.Generator().manual_seed(0))
    model = fake_device_model(tiny_model)
    with FakeDevice():
        _, cache = model.run_with_cache(on_fake_device(tokens))  # the user's tokens, on the model's device
        cap = ld.Capture.from_activation_cache(cache, model, on_fake_device(tokens))  # check=True: capture() runs prompt 0 again
    assert cap.packed["resid"].device.type == "cpu"  # a cache the user holds is copied to the host once


def test_hugging_face_hidden_states_from_the_device_make_the_capture_of_the_cpu(llama_path):
    tokens = torch.randint(3, 101, (2, 9), generator=torch.Generator().manual_seed(0))
    cpu_model = ld.load_model(llama_path)
    expected = ld.capture(cpu_model, [row.tolist() for row in tokens], exclude=())
    model = fake_device_model(ld.load_model(llama_path))
    hf, saved = model.original_model, []
    hf.model.norm.register_forward_pre_hook(lambda module, args: saved.append(args[0]))  # the final norm's input
    with FakeDevice():
        out = hf(on_fake_device(tokens), output_hidden_states=True)
        cap = ld.Capture.from_hidden_states(out.hidden_states, model, on_fake_device(tokens), last_state=saved[0],
                                            exclude=())
    assert cap.packed["resid"].device.type == "cpu"
    assert torch.equal(cap.packed["resid"], expected.packed["resid"])


def test_hidden_states_are_told_from_norm_outputs_with_the_norm_on_the_device():
    from lensdyn.hooks.external import normalised_tokens

    norm = fake_device_model(torch.nn.LayerNorm(6))
    x = on_fake_device(torch.randn(3, 6, generator=torch.Generator().manual_seed(0)) * 5)
    with FakeDevice():
        assert normalised_tokens(norm(x).detach(), norm).tolist() == [True] * 3
        assert normalised_tokens(x, norm).tolist() == [False] * 3


def test_the_default_analyses_run_on_the_device_and_equal_the_cpu_ones(llama_path):
    cpu_model = ld.load_model(llama_path)
    cpu_cap = ld.capture(cpu_model, PROMPTS)
    expected = {a.name: a.measure(cpu_cap, **small(a, cpu_model)) for a in registry.analyses() if not a.opt_in}
    model = fake_device_model(ld.load_model(llama_path))
    with FakeDevice():
        cap = ld.capture(model, PROMPTS)
        for analysis in registry.analyses():
            if not analysis.opt_in:
                result = analysis.measure(cap, **small(analysis, model))
                assert undated(result) == undated(expected[analysis.name]), analysis.name


def test_a_corpus_run_on_the_device_equals_the_cpu_one(llama_path, tmp_path):
    prompts = ld.PromptSet.from_texts(PROMPTS, name="words")
    cpu, _ = run_corpus(ld.load_model(llama_path), prompts, tmp_path / "cpu", chunk=2, progress=False)
    model = fake_device_model(ld.load_model(llama_path))
    with FakeDevice():
        device, record = run_corpus(model, prompts, tmp_path / "device", chunk=2, progress=False)
    expected, got = _flatten(cpu.to_dict()), _flatten(device.to_dict())
    assert expected.keys() == got.keys() and record["prompts_done"] == len(PROMPTS)
    for key in expected:
        assert np.array_equal(expected[key], got[key]), key


# --- on a CUDA device ---------------------------------------------------------------------

# Float32 activations through a few blocks, summed in another order on the GPU.
RTOL, ATOL = 1e-4, 1e-5


@needs_cuda
def test_capture_on_cuda_equals_the_cpu_capture(tiny_model):
    tokens = torch.randint(0, tiny_model.cfg.d_vocab, (3, 12), generator=torch.Generator().manual_seed(0))
    cpu = ld.capture(tiny_model, tokens)
    cap = ld.capture(tiny_model.to("cuda"), tokens)
    for stream, value in cap.packed.items():
        assert value.device.type == "cuda", stream
        torch.testing.assert_close(value.cpu(), cpu.packed[stream], rtol=RTOL, atol=ATOL)


@needs_cuda
def test_a_report_on_cuda_equals_the_cpu_report(llama_path, tmp_path):
    from lensdyn.app.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPTS[2])
    reports = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        # Curvature is left out: its built-in edit pairs are English words, not in this model's vocabulary.
        assert main(["report", "--model", llama_path, "--prompts", str(prompts), "--device", device,
                     "--analyses", "norms,massive,expansion,lens,gains,metastability", "--permutations", "5",
                     "--json-only", "--out", str(out)]) == 0
        reports[device] = {name: json.loads((out / f"{name}.json").read_text()) for name in ("norms", "gains")}
    for name, field in (("norms", "mean"), ("gains", "attn_gain")):
        cpu, cuda = (np.asarray(reports[d][name][field], dtype=float) for d in ("cpu", "cuda"))
        np.testing.assert_allclose(cuda, cpu, rtol=RTOL, atol=ATOL, err_msg=f"{name}.{field}")


@needs_cuda
def test_a_corpus_run_on_cuda_equals_the_cpu_one(llama_path, tmp_path):
    prompts = ld.PromptSet.from_texts(PROMPTS, name="words")
    cpu, _ = run_corpus(ld.load_model(llama_path), prompts, tmp_path / "cpu", chunk=2, progress=False)
    cuda, _ = run_corpus(ld.load_model(llama_path, device="cuda"), prompts, tmp_path / "cuda", chunk=2, progress=False)
    expected, got = _flatten(cpu.to_dict()), _flatten(cuda.to_dict())
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=RTOL, atol=ATOL, err_msg=key)
