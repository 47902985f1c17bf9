"""Lightning-native reload: ``YourModule.load_from_checkpoint`` on checkpoints written during and after compression and
pruning (a fresh, full-size instance of the user's class, no callback), and ``strategy="ddp_spawn"``."""

import tempfile

import lightning.pytorch as pl
import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_xai import CSWAPPruning, DigitsDataModule, LRPCompression, SelfCompression, load_pruned
from lightning_xai.callbacks import self_compression as self_compression_module
from lightning_xai.models import ImageClassifier
from lightning_xai.quantization.install import quantized_layers


def _outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def _x():
    return DigitsDataModule().dataset("test").tensors[0][:64]


@pytest.mark.parametrize("net", ["lenet", "resnet"])
def test_load_from_checkpoint_during_and_after_self_compression(tmp_path, net):
    pl.seed_everything(0)
    model = ImageClassifier(net, width=8) if net == "resnet" else ImageClassifier(net)
    sc = SelfCompression(gamma=2.0, remove_every_n_steps=5, log_every_n_steps=0)
    every = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=10, save_top_k=-1)
    trainer = quiet_trainer(tmp_path, [sc, every], max_epochs=2)
    trainer.fit(model, DigitsDataModule())
    assert sc.channels_removed > 0
    after = tmp_path / "after.ckpt"
    trainer.save_checkpoint(after)  # after fit: the fit-end removal included
    x = _x()
    expected = _outputs(model, x)
    for ckpt in [after, *sorted((tmp_path / "ck").glob("*.ckpt"))]:
        fresh = ImageClassifier.load_from_checkpoint(ckpt, map_location="cpu")  # no callback, full-size class
        assert not quantized_layers(fresh)
        out = _outputs(fresh, x)
        assert out.shape == expected.shape and torch.isfinite(out).all()
    torch.testing.assert_close(_outputs(ImageClassifier.load_from_checkpoint(after), x), expected, rtol=0, atol=1e-5)


def test_load_from_checkpoint_after_cswap_and_lrp(tmp_path):
    pl.seed_everything(0)
    x = _x()
    for cb in (
        CSWAPPruning(target_ratio=0.5, samples_per_class=4, curves=()),
        LRPCompression(relevance="absolute", prune=0.3, samples_per_class=4),
    ):
        model = ImageClassifier("lenet")
        trainer = quiet_trainer(tmp_path, [cb], max_epochs=1)
        trainer.fit(model, DigitsDataModule())
        path = tmp_path / f"{type(cb).__name__}.ckpt"
        trainer.save_checkpoint(path)
        fresh = ImageClassifier.load_from_checkpoint(path)
        torch.testing.assert_close(_outputs(fresh, x), _outputs(model, x), rtol=0, atol=1e-5)
        if isinstance(cb, CSWAPPruning):
            assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in fresh.parameters())


def test_resume_from_a_plain_checkpoint_continues_the_compact_model(tmp_path):
    """The plain full-size ``state_dict`` is for fresh instances; a run resumed with the callback gets the compact
    training state back (shapes, bits, batch-norm gates, which channels were removed) and ends exactly where an
    uninterrupted run ends."""
    kwargs = dict(gamma=2.0, remove_every_n_steps=5, log_every_n_steps=0, freeze_bits_after=1.0)
    pl.seed_everything(0)
    straight = ImageClassifier("resnet", width=8)
    quiet_trainer(tmp_path / "a", [SelfCompression(**kwargs)], max_epochs=2).fit(straight, DigitsDataModule())
    pl.seed_everything(0)
    first = ImageClassifier("resnet", width=8)
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, save_top_k=0)
    quiet_trainer(tmp_path / "b", [SelfCompression(**kwargs), ck], max_epochs=1).fit(first, DigitsDataModule())
    assert "lightning_xai" in torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)
    resumed = ImageClassifier("resnet", width=8)
    trainer = quiet_trainer(tmp_path / "c", [SelfCompression(**kwargs)], max_epochs=2)
    trainer.fit(resumed, DigitsDataModule(), ckpt_path=tmp_path / "ck" / "last.ckpt")
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


def test_ddp_spawn_with_cswap_pruning(tmp_path):
    """``strategy="ddp_spawn"`` (2 CPU processes): the weights Lightning hands back to the main process (whose model is
    the original, full-size one) load and compute exactly what the pruned model computes; the export holds the
    compact model."""
    pl.seed_everything(0)
    model = ImageClassifier("lenet")
    cswap = CSWAPPruning(target_ratio=0.4, samples_per_class=4, curves=(), export_path=str(tmp_path / "p.st"))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        callbacks=[cswap],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tempfile.mkdtemp(),
    )
    trainer.fit(model, DigitsDataModule())  # used to raise a size mismatch here
    compact, plan = load_pruned(tmp_path / "p.st", ImageClassifier("lenet"))
    assert plan and sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in model.parameters())
    x = _x()
    torch.testing.assert_close(_outputs(model, x), _outputs(compact, x), rtol=0, atol=1e-5)


def test_the_resize_hook_does_not_drag_the_trainer_into_deep_copies():
    """Under DDP the trainer's strategy holds thread locks; the fit-end callbacks deep-copy the module (MAC counting,
    trial copies). A hook holding the trainer strongly made every such copy fail with "cannot pickle _thread.lock"."""
    import copy
    import threading

    from lightning_xai.callbacks._resize import register_resize_hook

    class LockedTrainer:
        def __init__(self):
            self.lock = threading.Lock()

    trainer = LockedTrainer()
    module = torch.nn.Linear(3, 2)
    register_resize_hook(trainer, module)
    clone = copy.deepcopy(module)
    assert torch.equal(clone.weight, module.weight)
    clone.load_state_dict(module.state_dict())  # the copied hook still runs (a weak reference, no checkpoint)


def test_evaluating_without_fit_leaves_an_uncompressed_model_as_it_is_and_a_checkpoint_tests_the_same(
    tmp_path, monkeypatch
):
    """`trainer.validate/test` with SelfCompression attached train nothing: a model that was never compressed is
    not touched (before, the quantizers were installed and its 8-bit version evaluated); a checkpoint of a compressed
    run, tested on a fresh model through such a Trainer, gives the trained model's metrics exactly."""
    dm = DigitsDataModule(batch_size=64)
    torch.manual_seed(0)
    base = ImageClassifier("lenet")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    dm.setup("fit")
    loader = dm.test_dataloader()
    said: list[str] = []  # the callback's info lines (not through logging: other tests reconfigure its loggers)
    monkeypatch.setattr(self_compression_module, "rank_zero_info", lambda message, *a, **k: said.append(message))
    for run in ("validate", "test"):
        trainer = quiet_trainer(str(tmp_path), [SelfCompression()], limit_val_batches=1.0)
        getattr(trainer, run)(base, loader, verbose=False)
        assert f"`trainer.{run}` on a model without quantizers evaluates it as it is" in said[-1]
    assert not quantized_layers(base)
    assert list(base.state_dict()) == list(before)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())

    ck = ModelCheckpoint(dirpath=str(tmp_path / "ck"), save_last=True)
    trained = ImageClassifier("lenet")
    trainer = quiet_trainer(str(tmp_path), [SelfCompression(gamma=0.02), ck], max_epochs=2, limit_val_batches=1.0)
    trainer.fit(trained, dm)
    expected = trainer.test(trained, dm, verbose=False)[0]
    fresh = ImageClassifier("lenet")
    got = quiet_trainer(str(tmp_path), [SelfCompression(gamma=0.02)]).test(
        fresh, dm, ckpt_path=ck.last_model_path, verbose=False
    )[0]
    assert got == expected
