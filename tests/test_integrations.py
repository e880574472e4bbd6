"""fastsam inside the training stacks people use: Lightning, the Hugging Face Trainer, accelerate.

Each is held to the explicit loop of the same method (tests/test_step_closure.py's ``explicit_step``) on the
same batches, step for step where the framework lets a test look between steps.
"""
import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastsam

from _sam_loops import batches, explicit_step, loss_at, small_cnn

STEPS = 6
OPTIMIZERS = {
    "sam": lambda params: fastsam.SAM(params, torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9),
    "crsam": lambda params: fastsam.CRSAM(params, torch.optim.SGD, lr=0.05, momentum=0.9),
    "lastsam": lambda params: fastsam.LastSAM(params, torch.optim.Adam, switch_at=3, sharpness="sam", orthogonal=True,
                                              lr=1e-3),
    "gsam": lambda params: fastsam.GSAM(params, torch.optim.AdamW, rho=0.05, alpha=0.4, lr=1e-3),
    # SAM steps 0, 2, 4 keep g_v; the one-pass steps 1, 3, 5 reuse it (one closure call each)
    "looksam": lambda params: fastsam.LookSAM(params, torch.optim.SGD, rho=0.05, k=2, lr=0.05, momentum=0.9),
}


def explicit_snapshots(method, autocast=None):
    """State dicts of the small CNN after each of STEPS explicit-loop steps."""
    model = small_cnn()
    opt = OPTIMIZERS[method](model.parameters())
    out = []
    for batch in batches(model, STEPS):
        with autocast() if autocast else contextlib.nullcontext():
            explicit_step(model, opt, batch)
        out.append(copy.deepcopy(model.state_dict()))
    return out


def assert_states_close(actual, expected, rtol=1e-6, atol=1e-7):
    for k, v in expected.items():
        torch.testing.assert_close(actual[k], v, rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


# ---- PyTorch Lightning --------------------------------------------------------------------------------
def _lightning():
    L = pytest.importorskip("lightning")

    class Module(L.LightningModule):
        """A plain LightningModule: nothing in it knows about SAM."""

        def __init__(self, method):
            super().__init__()
            self.net, self.method = small_cnn(), method

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return OPTIMIZERS[self.method](self.net.parameters())

    class Snapshots(L.Callback):
        def __init__(self):
            self.states = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.states.append(copy.deepcopy(module.net.state_dict()))

    return L, Module, Snapshots


def _fit(method, **trainer_kwargs):
    L, Module, Snapshots = _lightning()
    data = batches(small_cnn(), STEPS)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
        torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])), batch_size=len(data[0][1]))
    snapshots = Snapshots()
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[snapshots],
                        **trainer_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's notes on num_workers and the like
        trainer.fit(Module(method), loader)
    return snapshots.states


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("method", list(OPTIMIZERS))
def test_lightning_automatic_optimization_equals_the_explicit_loop(method, precision):
    states = _fit(method, precision=precision)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16-mixed" else None
    expected = explicit_snapshots(method, autocast)
    assert len(states) == STEPS
    for i, (a, e) in enumerate(zip(states, expected)):
        assert int(a["1.num_batches_tracked"]) == i + 1  # BatchNorm counted the pass at w only
        assert_states_close(a, e)


def test_lightning_16_mixed_raises_one_clear_error():
    pytest.importorskip("lightning")
    from lightning.pytorch.plugins.precision import MixedPrecision

    # Lightning refuses precision="16-mixed" on the CPU; its plugin with a CPU GradScaler takes the same path.
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(RuntimeError, match='precision="bf16-mixed"'):
        _fit("sam", plugins=[plugin])


def test_lightning_gradient_accumulation_raises_instead_of_mixing_micro_batches():
    """Lightning runs the micro-batches before the last outside optimizer.step(closure): their grads would
    set the perturbation while the later passes see the last micro-batch only."""
    with pytest.raises(RuntimeError, match="accumulate_grad_batches=2"):
        _fit("sam", accumulate_grad_batches=2)


# ---- Hugging Face Trainer ---------------------------------------------------------------------------
def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 40, (n, 8), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.labels[i]}


def _hf_args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, learning_rate=0.1, optim="sgd",
                weight_decay=0.0, lr_scheduler_type="constant", use_cpu=True, report_to=[], save_strategy="no",
                logging_strategy="no", disable_tqdm=True, train_sampling_strategy="sequential",
                dataloader_num_workers=0, seed=0)
    base.update(kw)
    return TrainingArguments(**base)


def _hf_explicit(method, args, data, max_grad_norm, accumulation, summed):
    """The explicit loop of the method on the Trainer's batches, with the Trainer's base optimizer; clips the
    last pass's grads before the step (README, "Gradient clipping"); accumulates ``accumulation`` micro-batches
    per pass (README, "Gradient accumulation"). ``summed``: the micro-batch losses are not divided by their
    number, as the Trainer does for a model that takes loss kwargs (it leaves the scaling to the model's
    ``num_items_in_batch``, which BertForSequenceClassification's mean loss ignores)."""
    from fastsam.integrations.transformers import SAMTrainer

    model = _tiny_bert()
    model.train()
    base_cls, base_kwargs = SAMTrainer.get_optimizer_cls_and_kwargs(args, model)
    opt = HF_METHODS[method][0](model.parameters(), base_cls, **base_kwargs)
    rows = [data[i] for i in range(len(data))]
    micro = [rows[i:i + 4] for i in range(0, len(rows), 4)]

    def pass_(window):
        for mb in window:
            batch = {k: torch.stack([r[k] for r in mb]) for k in mb[0]}
            (model(**batch).loss / (1 if summed else len(window))).backward()

    for s in range(0, len(micro), accumulation):
        window = micro[s:s + accumulation]
        pass_(window)
        if not opt.sharpness_active:
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            opt.step()
            opt.zero_grad()
            continue
        opt.first_step(zero_grad=True)
        pass_(window)
        if method == "crsam":
            opt.second_step(zero_grad=True)
            pass_(window)
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.third_step(zero_grad=True) if method == "crsam" else opt.second_step(zero_grad=True)
    return model


# sam_method -> (the optimizer the explicit loop builds, the sam_kwargs SAMTrainer gets). LastSAM's fractional
# switch point takes the Trainer's planned steps (4): the switch is at step 2.
HF_METHODS = {
    "sam": (fastsam.SAM, {}),
    "crsam": (fastsam.CRSAM, {}),
    "lastsam": (lambda params, base, **kw: fastsam.LastSAM(params, base, switch_at=2, sharpness="sam", **kw),
                {"switch_at": 0.5, "sharpness": "sam"}),
    "gsam": (fastsam.GSAM, {}),
    "looksam": (lambda params, base, **kw: fastsam.LookSAM(params, base, k=2, **kw), {"k": 2}),
    "wsam_interval": (lambda params, base, **kw: fastsam.WSAM(params, base, max_norm=1.0, interval=2, **kw),
                      {"max_norm": 1.0, "interval": 2}),
}


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05])
@pytest.mark.parametrize("method", list(HF_METHODS))
def test_hf_sam_trainer_equals_the_explicit_loop(tmp_path, method, max_grad_norm, accumulation):
    from fastsam.integrations.transformers import SAMTrainer

    args = _hf_args(tmp_path, max_grad_norm=max_grad_norm, gradient_accumulation_steps=accumulation)
    data = _Rows(4 * 4 * accumulation)
    model = _tiny_bert()
    trainer = SAMTrainer(model=model, args=args, train_dataset=data, sam_method=method.split("_")[0],
                         sam_kwargs=HF_METHODS[method][1])
    trainer.train()
    opt = trainer._fastsam_optimizer()
    assert type(opt).__name__ == {"sam": "SAM", "crsam": "CRSAM", "lastsam": "LastSAM", "gsam": "GSAM",
                                  "wsam_interval": "WSAM", "looksam": "LookSAM"}[method]
    if method == "lastsam":
        assert opt.switch_step == 2 and opt.steps_done == 4
    expected = _hf_explicit(method, args, data, max_grad_norm, accumulation, trainer.model_accepts_loss_kwargs)
    for (n, a), (_, e) in zip(model.named_parameters(), expected.named_parameters()):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_hf_sam_trainer_takes_an_optimizer_instance(tmp_path):
    from fastsam.integrations.transformers import SAMTrainer

    args = _hf_args(tmp_path)
    model = _tiny_bert()
    base_cls, base_kwargs = SAMTrainer.get_optimizer_cls_and_kwargs(args, model)
    opt = fastsam.SAM(model.parameters(), base_cls, **base_kwargs)
    SAMTrainer(model=model, args=args, train_dataset=_Rows(16), optimizers=(opt, None)).train()
    expected = _hf_explicit("sam", args, _Rows(16), args.max_grad_norm, 1, True)
    for a, e in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_hf_sam_trainer_rejects_bad_arguments(tmp_path):
    from fastsam.integrations.transformers import SAMTrainer

    args, model = _hf_args(tmp_path), _tiny_bert()
    with pytest.raises(ValueError, match="sam_method must be one of"):
        SAMTrainer(model=model, args=args, sam_method="bsam")
    with pytest.raises(TypeError, match="sam_kwargs must be a dict"):
        SAMTrainer(model=model, args=args, sam_kwargs=0.05)
    with pytest.raises(TypeError, match="needs a fastsam optimizer"):
        SAMTrainer(model=model, args=args, optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="not both"):
        SAMTrainer(model=model, args=args, optimizers=(opt, None), sam_method="sam")
    with pytest.raises(ValueError, match=r"mode='authors'\) only"):
        SAMTrainer(model=model, args=args, sam_method="crsam", sam_kwargs={"mode": "paper"})


# ---- accelerate ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(OPTIMIZERS))
def test_accelerate_prepared_optimizer_follows_the_closure_contract(method):
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    model = small_cnn()
    model, opt = accelerator.prepare(model, OPTIMIZERS[method](model.parameters()))
    expected = explicit_snapshots(method)
    for i, batch in enumerate(batches(small_cnn(), STEPS)):
        def closure():
            loss = loss_at(model, batch)
            accelerator.backward(loss)
            return loss

        opt.step(closure)
        opt.zero_grad()
        assert_states_close(model.state_dict(), expected[i])
