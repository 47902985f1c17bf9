"""The rows of docs/ERRORS.md: (what the user does, the code that does it). The exact errors live in the doc;
tests/test_bad_input.py runs every row and compares. Regenerate the doc with ``python tests/bad_input_cases.py``."""

CASES = [
    ("SelfCompression: negative size penalty", "SelfCompression(gamma=-1.0)"),
    ("SelfCompression: bit-depth learning rate of zero", "SelfCompression(bits_lr=0)"),
    ("SelfCompression: freeze after more than the whole run", "SelfCompression(freeze_bits_after=1.5)"),
    ("SelfCompression: a warm-up longer than the run", "SelfCompression(gamma_warmup=2)"),
    ("SelfCompression: size pressure starting after the bits freeze", "SelfCompression(gamma_delay=0.9)"),
    ("SelfCompression: negative removal interval", "SelfCompression(remove_every_n_steps=-5)"),
    ("SelfCompression: export path of the wrong type", "SelfCompression(export_path=3)"),
    ("SelfCompression: unknown keep_channels choice", "SelfCompression(keep_channels='yes')"),
    ("quantizers: initial bit depth out of range", "install_quantizers(LeNet(), init_bits=0)"),
    ("quantizers: not a module", "install_quantizers('lenet')"),
    ("quantizers: a lazy layer not initialized yet", "install_quantizers(nn.Sequential(nn.LazyLinear(4), nn.ReLU()))"),
    ("SelfCompression: a lazy layer not initialized yet", "_fit([SelfCompression()], net='mlp', lazy=True)"),
    ("LRPCompression: in the same Trainer as SelfCompression", "_fit([SelfCompression(), LRPCompression()])"),
    ("LRPCompression: listed before SelfCompression", "_fit([LRPCompression(), SelfCompression()])"),
    ("PreservationGuard: empty preservation set", "PreservationGuard(fraction=0.0)"),
    ("PreservationGuard: negative λ", "PreservationGuard(lam=-0.5)"),
    ("PreservationGuard: both accuracy rules", "PreservationGuard(min_accuracy=0.9, max_drop=0.02)"),
    ("PreservationGuard: unknown uncertainty measure", "PreservationGuard(uncertainty='random')"),
    ("PreservationGuard: empty index list", "PreservationGuard(indices=[])"),
    ("PreservationGuard: Grad-CAM layer given as a number", "PreservationGuard(target_layer=3)"),
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
        "LRP: unsupported modules (every one listed)",
        "lrp(nn.Sequential(nn.Linear(3, 4), nn.Softmax(-1), nn.Linear(4, 4), nn.Softmin(-1), nn.Linear(4, 2)), "
        "torch.rand(2, 3))",
    ),
    (
        "LRP: batch norm that cannot be folded",
        "lrp(nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 2)).eval(), torch.rand(2, 3))",
    ),
    (
        "LRP: not a module",
        "lrp('lenet', torch.rand(2, 3))",
    ),
    ("LRP: alpha − beta ≠ 1", "AlphaBeta(alpha=2.0, beta=2.0)"),
    ("LRP: unknown attention rule", "Composite(attention='softmax')"),
    (
        "LRP: a model torch.fx cannot trace (branches on a tensor value)",
        "lrp(_Branching(), torch.rand(2, 3))",
    ),
    ("data: batch size of zero", "DigitsDataModule(batch_size=0)"),
    ("data: MNIST without a data folder (offline)", "make_datamodule('mnist', data_dir=None).prepare_data()"),
    ("models: LeNet on vector inputs", "build_model('lenet', (64,))"),
    ("SelfCompression: empty export path", "SelfCompression(export_path='')"),
    ("SelfCompression: export path that is a folder", "SelfCompression(export_path=_folder())"),
    ("SelfCompression: compile flag as a string", "SelfCompression(compile='yes')"),
    ("SelfCompression: two of them in one Trainer", "_fit([SelfCompression(), SelfCompression()])"),
    ("SelfCompression: layer patterns that select nothing", "_fit([SelfCompression(include='^nope$')])"),
    ("SelfCompression: a sharded strategy", "_setup(SelfCompression(), strategy=FSDPStrategy())"),
    ("SelfCompression: listed after a weight-averaging callback", "_after_averaging(SelfCompression())"),
    ("PreservationGuard: listed before a weight-averaging callback", "_before_averaging(PreservationGuard())"),
    ("SelfCompression: export of a model whose training diverged", "export_compressed(_nan_model(), _file())"),
    ("export: an unknown coding", "export_compressed(_quantized_lenet(), _file(), coding='zip')"),
    ("CSWAPPruning: export path of the wrong type", "CSWAPPruning(export_path=5)"),
    ("CSWAPPruning: ignore given as one string", "CSWAPPruning(ignore='fc')"),
    ("CSWAPPruning: ignore naming a layer with a typo", "_fit([CSWAPPruning(ignore=('net.classifer.1',))])"),
    ("CSWAPPruning: curves given as one string", "CSWAPPruning(curves='cswap')"),
    ("CSWAPPruning: an empty validation set", "_fit([CSWAPPruning(curves=())], val_size=0)"),
    ("CSWAPPruning: a model of transposed convolutions only", "_fit([CSWAPPruning()], net=_transposed_net())"),
    ("C-SWAP: NaN in the analysis samples", "cswap_order(MLP(4, 3, 8), *_mlp_units(nan=True))"),
    ("C-SWAP: removing channels of tied weights", "apply_cuts(_tied_net(), [ChannelCut('2', 'out', (0,))])"),
    ("AttributionPruning: loss given as a string", "AttributionPruning(loss_fn='ce')"),
    ("AttributionPruning: apply given as a string", "AttributionPruning(apply='no')"),
    ("AttributionPruning: layer types not in a tuple", "AttributionPruning(types=nn.Linear)"),
    ("LRPCompression: composite given as a string", "LRPCompression(composite='eps')"),
    ("LRPCompression: a single bit width", "LRPCompression(bits=(8,))"),
    ("LRPCompression: export path that is a folder", "LRPCompression(export_path=_folder())"),
    ("PreservationGuard: indices that are not integers", "PreservationGuard(indices=['a'])"),
    ("PreservationGuard: indices outside the training set", "_fit([PreservationGuard(indices=[10**6])])"),
    ("PreservationGuard: restored channels penalised more than others", "PreservationGuard(restored_penalty=2)"),
    ("PreservationGuard: an empty candidate pool", "PreservationGuard(max_candidates=0)"),
    ("PreservationGuard: samples of two inputs", "_fit([SelfCompression(), PreservationGuard()], paired=True)"),
    ("CSWAPPruning: samples of two inputs (refused before training)", "_fit([CSWAPPruning()], paired=True)"),
    ("files: a packed file with a flipped byte", "load_compressed(_flipped(), ImageClassifier('lenet'))"),
    (
        "files: a 10-class model loaded into a 5-class one",
        "load_compressed(_packed(), ImageClassifier('lenet', num_classes=5))",
    ),
    ("files: a packed file loaded into a quantized model", "load_compressed(_packed(), _quantized_lenet())"),
    ("data: MNIST folder without the files", "MNISTDataModule(_folder()).setup()"),
    ("data: MNIST validation split as large as the training set", "MNISTDataModule(_mnist(20), val_size=20).setup()"),
    ("data: MNIST folder given as a number", "MNISTDataModule(3)"),
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
