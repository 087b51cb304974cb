"""A training run's settings: the Config dataclass, its command-line flags and the family presets.

Nothing here imports TensorFlow: a command parses and checks its flags, and fills in the presets of
the chosen family (`tagger.models`), in a fraction of a second.
"""
import argparse
import dataclasses
import os
from dataclasses import dataclass

from tagger import models, schedules
from tagger.cli import positive_float, positive_int

DEMO_DATA = "tfrecords/demo"
# Keras dtype policies for the convolutional layers: float32, or 16-bit arithmetic with float32 weights
# for GPUs and CPUs with 16-bit matrix units; what each adds to a run's name.
PRECISIONS = {"float32": "", "mixed_bfloat16": "-bf16", "mixed_float16": "-fp16"}


@dataclass(frozen=True)
class Config:
    arch: str
    data: str
    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    momentum: float
    seed: int = 0
    width: float = 1.0          # channel multiplier, < 1 for quick tests and the demo
    schedule: str = "constant"  # or won2020 (tagger.schedules)
    weight_decay: float = 0.0   # coupled L2 (tagger.optimizers)
    restore_best: bool = False
    shuffle_buffer: int = 512
    strategy: str = "default"   # or "mirrored": tf.distribute.MirroredStrategy over --devices
    devices: int = 0            # mirrored: how many GPUs (0: all), or CPU logical devices without a GPU
    scale_lr: bool = False      # mirrored: multiply lr by the number of replicas
    precision: str = "float32"  # or mixed_bfloat16 / mixed_float16 (PRECISIONS)
    run_name: str = ""
    runs_dir: str = "runs"
    models_dir: str = "saved_models"
    stop_after: int = 0         # stop (resumably) once this epoch is done, before --epochs; 0: never
    init: str = ""              # an export whose weights the run starts from (tagger.finetune)
    freeze: str = ""            # "body": train the output layer alone
    threshold_rule: str = "f1"  # how each tag's threshold is chosen on the valid split (tagger.decisions)
    demo: bool = False
    options: tuple = ()         # the family's own settings, ((name, value), ...) in its order

    @property
    def family(self):
        return models.get(self.arch)

    def option_values(self):
        return dict(self.options)

    def settings(self):
        """Every setting as one flat dict (the family's options beside the rest): what config.json records."""
        values = dataclasses.asdict(self)
        del values["options"]
        return {**values, **self.option_values()}

    def default_run_name(self):
        data = os.path.basename(self.data.rstrip("/"))
        shape = self.family.run_name.format(**self.option_values())
        width = f"-w{self.width:g}" if self.width != 1 else ""
        schedule = f"-{self.schedule.replace(':', '').replace(',', '-')}" if self.schedule != "constant" else ""
        decay = f"-wd{self.weight_decay:g}" if self.weight_decay else ""
        best = "-best" if self.restore_best else ""
        best += f"-thr{self.threshold_rule.replace(':', '')}" if self.threshold_rule != "f1" else ""
        best += (f"-from-{os.path.basename(self.init.rstrip('/'))}" if self.init else "") + (
            f"-frozen{self.freeze}" if self.freeze else "")
        mirrored = (f"-mirrored{self.devices or ''}" + ("-scaledlr" if self.scale_lr else "")
                    if self.strategy == "mirrored" else "")
        return (f"{self.arch}{shape}{width}-{data}-{self.optimizer}-lr{self.lr:g}"
                + (f"-m{self.momentum:g}" if self.optimizer == "sgd" else "")
                + f"-b{self.batch_size}-e{self.epochs}{schedule}{decay}-s{self.seed}{PRECISIONS[self.precision]}"
                + f"{best}{mirrored}")


FIELDS = {f.name for f in dataclasses.fields(Config)} - {"options"}


def arch_list(text):
    """argparse type: comma-separated registered family names."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in models.REGISTRY]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r}: no family given")
    if unknown:
        raise argparse.ArgumentTypeError(f"{text!r}: unknown famil{'ies' if len(unknown) > 1 else 'y'} "
                                         f"{', '.join(unknown)} (registered: {', '.join(models.names())})")
    return names


def add_family_flags(parser, default=models.DEFAULT):
    """--arch and every family's own settings (each checked against the chosen family later)."""
    parser.add_argument("--arch", choices=models.names(), default=default,
                        help=f"model family (default {models.DEFAULT}): "
                        + "; ".join(f"{f.name}: {f.summary}" for f in models.families()))
    for name, (option, owners) in models.all_options().items():
        parser.add_argument(option.flag, type=option.type, dest=name,
                            help=f"{', '.join(owners)}: {option.help} (default {option.default})")


def add_training_flags(parser):
    """The training settings; each defaults to the family's preset (its demo preset without --data)."""
    preset = " (default: the family's preset; its demo preset without --data)"
    parser.add_argument("--epochs", type=positive_int, help="epochs to train" + preset)
    parser.add_argument("--batch-size", type=positive_int, help="clips per step" + preset)
    parser.add_argument("--optimizer", choices=("sgd", "adam"), help="the optimizer" + preset)
    parser.add_argument("--lr", type=positive_float, help="learning rate" + preset)
    parser.add_argument("--momentum", type=float, help="SGD momentum, in [0, 1)" + preset)
    parser.add_argument("--schedule", help="constant, or won2020 (Won et al. 2020: Adam, then SGD with drops; "
                        "won2020:A,B,C switches after epochs A, B, C)" + preset)
    parser.add_argument("--weight-decay", type=float, help="coupled L2 weight decay, added to the gradients as "
                        "PyTorch does (default: the family's preset, 0 for the study's)")
    parser.add_argument("--width", type=positive_float, help="multiply channel counts (tests, quick checks)" + preset)
    parser.add_argument("--precision", choices=tuple(PRECISIONS), help="mixed_bfloat16 / mixed_float16: 16-bit "
                        "convolutions and dense layers with float32 weights, for GPUs (and CPUs with AVX-512 BF16 "
                        "or AMX); front ends, recurrent and output layers stay float32, and the test evaluation and "
                        "export use a float32 copy (default: float32)")


def check_family_flags(parser, args):
    """The family of --arch and the options given for it; a usage error (exit 2) for an option of
    another family or a value out of range."""
    family = models.get(args.arch)
    own = {o.name: o for o in family.options}
    given = {name: getattr(args, name) for name in models.all_options() if getattr(args, name, None) is not None}
    for name in given:
        if name not in own:
            flags = ", ".join(o.flag for o in family.options) or "none"
            parser.error(f"{models.all_options()[name][0].flag} is not a setting of {family.name} "
                         f"({family.name}'s own: {flags})")
        problem = own[name].check(given[name])
        if problem:
            parser.error(problem)
    problem = family.validate(given)
    if problem:
        parser.error(problem)
    return family, given


def check_training_flags(parser, args):
    """The flags of add_training_flags whose values argparse alone cannot check."""
    if args.momentum is not None and not 0 <= args.momentum < 1:
        parser.error(f"--momentum {args.momentum} must be in [0, 1)")
    if args.weight_decay is not None and args.weight_decay < 0:
        parser.error(f"--weight-decay {args.weight_decay} must be 0 or more")
    problem = args.schedule and schedules.check(args.schedule)
    if problem:
        parser.error(problem)


def make_config(family, args, given, **fixed):
    """The Config of a run: the family's presets (the study's, then the demo's when --data is omitted),
    overridden by the flags given (`args`, and `given`, the family's options), then by `fixed`."""
    flags = {k: v for k, v in vars(args).items() if v is not None and k in FIELDS and k != "data"}
    return preset_config(family, args.data, **{**flags, **given, **fixed})


def preset_config(family, data=None, **settings):
    """The Config of `family` on `data` (None: the demo, with its preset) with `settings` over its preset."""
    demo = data is None
    values = {**family.preset(demo), **settings, "arch": family.name, "data": data or DEMO_DATA, "demo": demo}
    options = tuple((o.name, values.pop(o.name)) for o in family.options)
    config = Config(**values, options=options)
    return config if config.run_name else dataclasses.replace(config, run_name=config.default_run_name())


def compared_settings(config):
    """The settings two runs (or searches) must share to be the same: all but the output folders and
    where a session stops."""
    return {k: v for k, v in config.settings().items() if k not in ("runs_dir", "models_dir", "stop_after")}


def config_defaults():
    """Each Config field's default: the value of a field that a record written before it existed lacks."""
    return {f.name: f.default for f in dataclasses.fields(Config)
            if f.default is not dataclasses.MISSING and f.name != "options"}


def settings_differ(before, config):
    """The settings of `config` that differ from a recorded config (config.json's "config"); a field
    the record lacks (written by an older version) counts as its default. Output folders don't count."""
    defaults = config_defaults()
    return [k for k, v in compared_settings(config).items() if before.get(k, defaults.get(k)) != v]
