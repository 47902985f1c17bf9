"""The rows of docs/ERRORS.md: (what the user does, the code that does it). The exact errors live in the doc;
tests/test_bad_input.py runs every row and compares. Regenerate the doc with ``python tests/bad_input_cases.py``."""

CASES = [
    ("SelfCompression: negative size penalty", "SelfCompression(gamma=-1.0)"),
    ("SelfCompression: bit-depth learning rate of zero", "SelfCompression(bits_lr=0)"),
    ("SelfCompression: freeze after more than the whole run", "SelfCompression(freeze_bits_after=1.5)"),
    ("SelfCompression: negative removal interval", "SelfCompression(remove_every_n_steps=-5)"),
    ("SelfCompression: export path of the wrong type", "SelfCompression(export_path=3)"),
    ("quantizers: initial bit depth out of range", "install_quantizers(LeNet(), init_bits=0)"),
    ("quantizers: not a module", "install_quantizers('lenet')"),
    ("PreservationGuard: empty preservation set", "PreservationGuard(fraction=0.0)"),
    ("PreservationGuard: negative λ", "PreservationGuard(lam=-0.5)"),
    ("PreservationGuard: both accuracy rules", "PreservationGuard(min_accuracy=0.9, max_drop=0.02)"),
    ("PreservationGuard: unknown uncertainty measure", "PreservationGuard(uncertainty='random')"),
    ("PreservationGuard: empty index list", "PreservationGuard(indices=[])"),
    ("CSWAPPruning: remove every parameter", "CSWAPPruning(target_ratio=1.0)"),
    ("CSWAPPruning: unknown method", "CSWAPPruning(method='lrp')"),
    ("CSWAPPruning: 'non-critical only' with a baseline method", "CSWAPPruning(method='omp')"),
    ("CSWAPPruning: unknown curve", "CSWAPPruning(curves=('cswap', 'l1'))"),
    ("CSWAPPruning: analysis on the test split", "CSWAPPruning(analysis_split='test')"),
    ("CSWAPPruning: one sample per class (no t-test)", "CSWAPPruning(samples_per_class=1)"),
    ("C-SWAP: unknown engine", "cswap_order(MLP(4, 3, 8), *_mlp_units(), mode='quick')"),
    (
        "C-SWAP: significance level above 1",
        "classify_neurons(torch.rand(4), torch.rand(2, 4), torch.tensor([0, 0, 1, 1]), alpha=2)",
    ),
    ("C-SWAP: plan naming an unknown layer", "count_parameters(MLP(4, 3, 8), _mlp_units()[0], {'nope': [0]})"),
    ("C-SWAP: channel index out of range", "count_parameters(MLP(4, 3, 8), _mlp_units()[0], {'net.1': [99]})"),
    ("C-SWAP: loading a file that is not a pruned model", "load_pruned(_foreign_file(), LeNet())"),
    ("AttributionPruning: unknown scorer", "AttributionPruning(scorer='lrp')"),
    ("AttributionPruning: unknown mode", "AttributionPruning(mode='drop')"),
    ("AttributionPruning: pruning most of the layers", "AttributionPruning(fraction=0.9)"),
    (
        "layer pruning: bypassing a layer that changes the shape",
        "prune_layers(SmallResNet(width=4), ['layers.1.conv1'], 'bypass', torch.randn(2, 1, 8, 8))",
    ),
    ("layer scores: a layer name the model does not have", "L1Scorer(layers=['nope']).score(LeNet())"),
    ("LRPCompression: unknown relevance kind", "LRPCompression(relevance='abs')"),
    ("LRPCompression: pruning quantile of 1.5", "LRPCompression(prune=1.5)"),
    ("LRPCompression: low bits above high bits", "LRPCompression(bits=(4, 8))"),
    (
        "LRP: unsupported activation module",
        "lrp(nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2)), torch.rand(2, 3))",
    ),
    (
        "LRP: batch norm that cannot be folded",
        "lrp(nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 2)).eval(), torch.rand(2, 3))",
    ),
    (
        "LRP: grouped convolution",
        "lrp(nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2)), torch.rand(2, 2, 3, 3))",
    ),
    ("LRP: alpha − beta ≠ 1", "AlphaBeta(alpha=2.0, beta=2.0)"),
    ("data: batch size of zero", "DigitsDataModule(batch_size=0)"),
    ("data: MNIST without a data folder (offline)", "make_datamodule('mnist', data_dir=None).prepare_data()"),
    ("models: LeNet on vector inputs", "build_model('lenet', (64,))"),
]


def render() -> str:
    from test_bad_input import run_case  # noqa: PLC0415

    lines = [
        "# Errors a user gets for bad input",
        "",
        "Every row is run by `tests/test_bad_input.py`, which checks that the error type and message are exactly",
        "these.",
        "Arguments are checked when a callback is created, before any training; unsupported layers are named.",
        "",
        "| situation | code | error |",
        "|---|---|---|",
    ]
    for title, code in CASES:
        kind, message = run_case(code)
        escaped = message.replace("|", "\\|")
        lines.append(f"| {title} | `{code}` | {kind}: {escaped} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    (Path(__file__).resolve().parents[1] / "docs" / "ERRORS.md").write_text(render())
    print("docs/ERRORS.md written")
