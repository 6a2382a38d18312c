"""``featinv train``, ``featinv features cache`` and ``featinv data shapes``: the CLI of
:mod:`featinv.training` (see :mod:`featinv.cli` for the conventions every command follows)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported by the commands that run, not by --help
    import torch

from featinv.choices import CACHE_DTYPES, DISTILL_TARGETS, MIXED_PRECISION
from featinv.cli.options import (
    Parser,
    add_dtype_arg,
    add_model_args,
    add_source_args,
    classifier_source,
    json_object_arg,
    load_model,
    new_extractor,
    only_with,
    required_extractor,
    staged_output,
)
from featinv.errors import FeatInvError
from featinv.limits import arg


def _stream(data: str, size: int, *, pool: int, seed: int, augment: bool):
    """The training stream for ``--data``: ``shapes`` (a seeded pool) or an ImageNet-layout folder."""
    if data == "shapes":
        import torch

        from featinv.data.streams import ShapesStream

        return ShapesStream(pool_size=pool, seed=seed, device=torch.device("cpu"), size=size)
    from featinv.data.image_folder import ImageFolderStream

    return ImageFolderStream(data, size, seed=seed, augment=augment)


def _model_and_extractor(args: argparse.Namespace, device: torch.device):
    model = load_model(args.model, args.trust_code).to(device)
    extractor = required_extractor(model, args.classifier_weights, args.model, args.trust_code)
    return model, extractor.to(device)


# Flags that one way of training does not take: (their argparse names, why), checked before any work.
REFUSED_FLAGS = {
    "preset": (
        ("consistency_weight", "validate_every", "validation_images", "gradient_checkpointing", "transfer_from"),
        "applies to --model training, not to --preset",
    ),
    "distill": (("validate_every",), "does not go with --distill"),
    "transfer": (
        ("distill", "student", "consistency_weight", "validate_every", "features_cache", "gradient_checkpointing"),
        "does not go with --transfer-from (train the transferred model afterwards for those)",
    ),
}


def _refuse_flags(args: argparse.Namespace, mode: str) -> None:
    flags, why = REFUSED_FLAGS[mode]
    for flag in flags:
        if getattr(args, flag):
            raise FeatInvError(f"--{flag.replace('_', '-')} {why}")


def _teacher(folder: str, trust_code: bool = False):
    """The model folder given to --transfer-from, with its classifier."""
    from featinv.models.featinv_model import FeatInvModel

    if not Path(folder).is_dir():
        raise FeatInvError(f"--transfer-from folder not found: {folder}")
    teacher = FeatInvModel.from_pretrained(folder, trust_code=trust_code)
    if teacher.classifier is None:
        raise FeatInvError(f"--transfer-from {folder} stores no classifier: its hint embeddings need one")
    return teacher


def cmd_train(args: argparse.Namespace) -> int:
    """Train the shapes-demo preset, or the ControlNet of a model folder on shapes or an image folder."""
    from featinv.training.loop import TrainConfig

    if (args.preset is None) == (args.model is None):
        raise FeatInvError("give exactly one of --preset shapes-demo or --model DIR")
    common = {
        "checkpoint_every": args.checkpoint_every,
        "keep_checkpoints": args.keep_checkpoints,
        "grad_accum": args.grad_accum,
        "ema_decay": args.ema,
        "mixed_precision": args.mixed_precision,
    }
    if args.preset is not None:
        from featinv.training.demo_preset import train_shapes_demo

        if args.preset != "shapes-demo":
            raise FeatInvError(f"--preset must be shapes-demo, got {args.preset!r}")
        _refuse_flags(args, "preset")
        train_shapes_demo(
            args.out,
            device=_device(args),
            scale=args.scale,
            time_budget_s=args.time_budget,
            resume=args.resume,
            features_cache=args.features_cache,
            **common,
        )
        return 0
    if args.transfer_from is not None:
        _refuse_flags(args, "transfer")
    if args.distill:
        _refuse_flags(args, "distill")
        if args.consistency_weight is not None and args.distill_target != "trajectory":
            raise FeatInvError("--consistency-weight goes with --distill only with --distill-target trajectory")
        from featinv.training.distill import DistillConfig

        distillation = DistillConfig(  # checked before any work
            guidance_scale=args.distill_guidance, target=args.distill_target, teacher_steps=args.teacher_steps
        )
    from featinv.distributed import get_accelerator
    from featinv.training.feature_cache import OnlineFeatures, load_cache
    from featinv.training.loop import loss_curve_png
    from featinv.training.losses import FeatureConsistencyLoss
    from featinv.training.train import train_controlnet

    accelerator = get_accelerator(_device(args))
    model, extractor = _model_and_extractor(args, accelerator.device)
    if args.transfer_from is not None:
        from featinv.training.transfer import check_transferable

        teacher = _teacher(args.transfer_from, args.trust_code).to(accelerator.device)
        check_transferable(model, teacher)  # before the pool is drawn
    config = TrainConfig(
        steps=args.steps, lr=args.lr, batch_size=args.batch_size, time_budget_s=args.time_budget, **common
    )
    stream = _stream(
        args.data, model.image_size[0], pool=args.pool, seed=args.seed, augment=args.features_cache is None
    )
    if args.transfer_from is not None:
        features = None  # the transfer reads the classifiers' maps itself
    elif args.features_cache is None:
        features = OnlineFeatures(extractor)
    else:
        features = load_cache(args.features_cache, extractor, stream)
    consistency = (
        None
        if args.consistency_weight is None
        else FeatureConsistencyLoss(extractor, weight=args.consistency_weight, max_timestep=args.consistency_max_t)
    )
    out = Path(args.out)
    after_step = None
    if args.validate_every:
        from featinv.training.validation import Validation, validation_images

        images, origin = validation_images(stream, model.image_size[0], args.validation_images)
        after_step = Validation(
            model,
            extractor,
            images,
            out / "validation",
            every=args.validate_every,
            final_step=args.steps,
            steps=args.validation_steps,
            is_main=accelerator.is_main_process,
        )
        if accelerator.is_main_process:
            print(f"validation: {origin} every {args.validate_every} steps into {out / 'validation'}")
    places = {"checkpoint_dir": out / "checkpoints", "log_path": out / "train_log.jsonl", "resume": args.resume}
    if args.transfer_from is not None:
        from featinv.training.transfer import transfer_controlnet

        result = transfer_controlnet(model, extractor, teacher, stream, config, **places)
    elif args.distill:
        from featinv.training.distill import distill

        if model.distillation is not None:
            raise FeatInvError(f"{args.model} is distilled already: distil from the teacher's folder")
        student = None
        if args.student is not None:
            if not Path(args.student).is_dir():
                raise FeatInvError(f"--student folder not found: {args.student}")
            from featinv.models.featinv_model import FeatInvModel

            student = FeatInvModel.from_pretrained(args.student, trust_code=args.trust_code)
        result = distill(
            model,
            features,
            stream,
            config,
            distillation,
            seed=args.seed,
            student=student,
            consistency=consistency,
            **places,
        )
    else:
        result = train_controlnet(
            model,
            features,
            stream,
            config,
            seed=args.seed,
            consistency=consistency,
            gradient_checkpointing=args.gradient_checkpointing,
            after_step=after_step,
            **places,
        )
    if accelerator.is_main_process:
        model.to("cpu").save_pretrained(out / "model")
        loss_curve_png(out / "train_log.jsonl", out / "loss_curve.png")
        state = "finished" if result.finished else f"stopped at step {result.steps_done} (--resume continues)"
        print(f"{state}; wrote {out / 'model'}, train_log.jsonl and loss_curve.png")
    return 0


def cmd_from_checkpoint(args: argparse.Namespace) -> int:
    """A model folder from one of a run's checkpoints (e.g. the one that validated best)."""
    from featinv.models.featinv_model import FeatInvModel
    from featinv.training.checkpoint import load_checkpoint
    from featinv.training.from_checkpoint import load_checkpoint_into

    if not Path(args.checkpoint).is_dir():
        raise FeatInvError(f"--checkpoint folder not found: {args.checkpoint} (a run's OUT/checkpoints/step-NNNNNNN)")
    try:
        checkpoint = load_checkpoint(args.checkpoint)
    except ValueError as error:
        raise FeatInvError(f"--checkpoint: {error}") from error
    model = FeatInvModel.from_pretrained(args.model, trust_code=args.trust_code)
    which = load_checkpoint_into(model, checkpoint, ema=not args.raw)
    with staged_output(args.out) as staging:
        model.save_pretrained(staging)
    weights = "its moving average (--ema)" if which == "ema" else "its raw weights"
    print(f"wrote {args.out}: {args.model} with the {checkpoint.state['stage']} of step {checkpoint.step}, {weights}")
    return 0


def cmd_train_classifier(args: argparse.Namespace) -> int:
    """Train a classifier (timm, torchvision, transformers or a user module) on shapes or an
    ImageNet-layout folder; write its weights, its accuracy (held-out shapes, or the folder's own
    images) and the ``create`` line that uses it."""
    import json

    import torch

    from featinv.data.shapes import CLASSES, HELD_OUT_SEED, generate_shapes
    from featinv.distributed import get_accelerator
    from featinv.files import write_text_atomic
    from featinv.training.classifier import accuracy
    from featinv.training.loop import TrainConfig
    from featinv.training.train import train_classifier
    from featinv.weights import save_state_dict_atomic

    model_kwargs = json_object_arg("--classifier-kwargs", args.classifier_kwargs)
    accelerator = get_accelerator(_device(args))
    torch.manual_seed(args.seed)
    source, name = classifier_source(args.source, args.classifier, args.classifier_module)
    extractor = new_extractor(  # its name and fields checked, the classifier built, before the pool
        source,
        args.classifier,
        args.classifier_module,
        weights=args.classifier_weights,
        kwargs_text=args.classifier_kwargs,
        input_side=args.input_size,
        normalization_text=args.classifier_normalization,
    ).to(accelerator.device)
    name = extractor.spec.model  # a module's file path made absolute
    head = extractor.linear_head()
    if head is None:
        raise FeatInvError(
            f"{extractor.backbone.describe_name()} has no classification head (a final nn.Linear) to train"
        )
    stream = _stream(args.data, args.image_size, pool=args.pool, seed=args.seed, augment=True)
    classes = list(CLASSES) if args.data == "shapes" else stream.classes
    if head.out_features < len(classes):
        field = "num_labels" if source == "transformers" else "num_classes"
        raise FeatInvError(
            f"{name} has {head.out_features} outputs and the data {len(classes)} classes: "
            f'add "{field}": {len(classes)} to --classifier-kwargs'
        )
    out = Path(args.out)
    config = TrainConfig(
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        time_budget_s=args.time_budget,
        checkpoint_every=args.checkpoint_every,
    )
    places = {"checkpoint_dir": out / "checkpoints", "log_path": out / "train_log.jsonl", "resume": args.resume}
    result = train_classifier(extractor, stream, config, **places)
    if not accelerator.is_main_process:
        return 0
    extractor.eval()
    if args.data == "shapes":
        held_out = generate_shapes(args.held_out, HELD_OUT_SEED, size=args.image_size)
        images, labels, where = held_out.images, held_out.labels, f"{args.held_out} held-out shapes"
    else:
        plain = _stream(args.data, args.image_size, pool=args.pool, seed=args.seed, augment=False)
        index = torch.arange(len(plain))
        images, labels = plain.take(index, torch.zeros_like(index, dtype=torch.bool))
        where = f"the {len(stream)} training images of {args.data} (no held-out split)"
    rate, interval = accuracy(extractor, images, labels)
    weights = out / "classifier.safetensors"
    save_state_dict_atomic(extractor.classifier.state_dict(), weights)
    record = {
        "classifier": name,
        **({"source": source} if source != "timm" else {}),
        "model_kwargs": model_kwargs,
        "input_size": list(extractor.spec.input_size),
        "classes": classes,
        "steps": result.steps_done,
        "accuracy": {"images": where, "top1": rate, "ci95": list(interval)},
    }
    write_text_atomic(out / "classifier.json", json.dumps(record, indent=2) + "\n")
    state = "finished" if result.finished else f"stopped at step {result.steps_done} (--resume continues)"
    print(f"{state}; accuracy on {where}: {rate:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]")
    print(f"wrote {weights} and classifier.json; make a FeatInv model for it with")
    kwargs = f" --classifier-kwargs '{json.dumps(model_kwargs)}'" if model_kwargs else ""
    size = f" --input-size {args.input_size}" if args.input_size else ""
    named = {
        "timm": f"--classifier {name}",
        "module": f"--classifier-module {name}",
    }.get(source, f"--source {source} --classifier {name}")
    print(f"  featinv create {named}{kwargs}{size} --classifier-weights {weights} ...")
    return 0


def cmd_features_cache(args: argparse.Namespace) -> int:
    """Compute a training pool's feature maps once (unflipped and flipped) into a safetensors file."""
    from featinv.pipeline import resolve_device
    from featinv.training.feature_cache import build_cache

    model, extractor = _model_and_extractor(args, resolve_device(args.device))
    stream = _stream(args.data, model.image_size[0], pool=args.pool, seed=args.seed, augment=False)
    path = build_cache(extractor, stream, args.out, batch_size=args.batch_size, dtype=args.dtype)
    print(f"wrote the features of {len(stream)} images ({extractor.spec.describe()}, x2 flips) to {path}")
    return 0


def cmd_data_shapes(args: argparse.Namespace) -> int:
    """Write a shapes dataset in ImageNet layout: images/<class>/NNNNN.png and masks/<class>/NNNNN.png."""
    from featinv.data.shapes import write_shapes

    write_shapes(args.out, n=args.n, seed=args.seed, size=args.size)
    print(f"wrote {args.n} shapes images and masks ({args.size} px, seed {args.seed}) to {args.out}")
    return 0


def _device(args: argparse.Namespace) -> str:
    """``--device``, ``auto`` resolved (cuda when there is one)."""
    from featinv.pipeline import resolve_device

    return str(resolve_device(args.device))


def add_loop_args(parser: argparse.ArgumentParser, *, steps: int, batch_size: int, lr: float, only: str = "") -> None:
    """The training loop's options (featinv.training.loop.Trainer), with the command's defaults;
    ``only`` prefixes the help of those that apply to one way of training (e.g. "with --model: ")."""
    parser.add_argument(
        "--device", default="auto", help="auto (cuda when there is one), cpu or cuda (accelerate picks the rank's GPU)"
    )
    parser.add_argument(
        "--steps", type=arg("train_steps"), default=steps, help=f"{only}optimizer steps (default {steps})"
    )
    parser.add_argument(
        "--batch-size",
        type=arg("batch_size"),
        default=batch_size,
        help=f"{only}global batch per micro-step (default {batch_size})",
    )
    parser.add_argument("--lr", type=arg("lr"), default=lr, help=f"{only}peak learning rate (default {lr:g})")
    parser.add_argument(
        "--pool", type=arg("pool"), default=50_000, help="with --data shapes: images in the training pool"
    )
    parser.add_argument("--seed", type=arg("seed"), default=1)
    parser.add_argument(
        "--checkpoint-every", type=arg("every"), default=500, help="steps between checkpoints (0: at stops)"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in --out")
    parser.add_argument("--time-budget", type=arg("seconds"), help="seconds; stops early past it (checkpointed)")


def add_training_commands(commands) -> None:
    """Register the training commands on the ``featinv`` sub-parsers."""
    train = commands.add_parser("train", help="train the shapes-demo preset, or a model's ControlNet on data")
    train.add_argument("--preset", help="shapes-demo: the built-in default's classifier, base and ControlNets")
    train.add_argument("--model", help="a model folder (from 'featinv create'): train its ControlNet, base frozen")
    train.add_argument("--classifier-weights", help="classifier weights file (if the model stores none)")
    train.add_argument("--data", default="shapes", help="with --model: shapes, or an ImageNet-layout folder")
    train.add_argument("--out", required=True, help="output folder (models, checkpoints/, train_log.jsonl)")
    train.add_argument("--scale", type=arg("scale"), default=1.0, help="with --preset: multiply the step counts")
    add_loop_args(train, steps=5000, batch_size=64, lr=5e-4, only="with --model: ")
    train.add_argument("--grad-accum", type=arg("grad_accum"), default=1, help="micro-batches per optimizer step")
    train.add_argument("--ema", type=arg("ema"), help="EMA decay of the trained weights, e.g. 0.999 (default: off)")
    train.add_argument("--features-cache", help="a cache from 'featinv features cache' instead of online features")
    train.add_argument(
        "--consistency-weight",
        type=arg("weight"),
        help="with --model: add W * (1 - cosine) between the features of the one-step clean estimate and the "
        "condition (ControlNet++-style feature consistency; default: off)",
    )
    train.add_argument(
        "--consistency-max-t",
        type=arg("timestep"),
        default=400,
        help="with --consistency-weight: only timesteps below this",
    )
    train.add_argument(
        "--mixed-precision",
        choices=MIXED_PRECISION,
        default="auto",
        help="autocast of the forward pass (accelerate's choices; fp16 with a gradient scaler); auto: bf16 on CUDA, "
        "none on a CPU",
    )
    train.add_argument(
        "--keep-checkpoints",
        type=arg("keep_checkpoints"),
        default=2,
        help="the newest N checkpoints are kept (default 2; 0: all, to choose one on validation images and "
        "make a model of it with 'featinv from-checkpoint')",
    )
    train.add_argument(
        "--gradient-checkpointing", action="store_true", help="with --model: recompute activations (less memory)"
    )
    train.add_argument(
        "--validate-every",
        type=arg("every"),
        default=0,
        help="with --model: reconstruct validation images every N steps",
    )
    train.add_argument(
        "--validation-images",
        nargs="+",
        help="with --validate-every: image files (default: held-out shapes images, or images of --data)",
    )
    train.add_argument(
        "--validation-steps", type=arg("steps"), default=20, help="sampler steps of the validation pictures"
    )
    train.add_argument(
        "--distill",
        action="store_true",
        help="with --model: distil the (trained) model into a few-step one, its ControlNet the student "
        "(sampled with 4 steps and no guidance)",
    )
    train.add_argument(
        "--distill-guidance",
        type=arg("distill_guidance"),
        default=1.75,
        help="with --distill: the teacher's guidance, folded in",
    )
    train.add_argument(
        "--distill-target",
        choices=DISTILL_TARGETS,
        default="guidance",
        help="with --distill: the teacher's guided noise in one branch (default; sampled by 4 DPM-Solver++ "
        "steps); trajectory: the student's 4-step solve fitted to the teacher's (with --student, a second stage); "
        "or a consistency model (lcm sampler) fitted to LCM's bootstrapped one-step target or to the teacher's "
        "ODE endpoint",
    )
    train.add_argument(
        "--teacher-steps",
        type=arg("steps"),
        default=6,
        help="with --distill-target endpoint or trajectory: the teacher's DPM-Solver++ steps",
    )
    train.add_argument(
        "--student",
        help="with --distill: start the student from this model folder, distilled from the same teacher "
        "(e.g. --distill-target trajectory after guidance)",
    )
    train.add_argument(
        "--transfer-from",
        metavar="DIR",
        help="start the ControlNet from this trained model's (same base, another classifier) and train only "
        "the hint encoder to give its hint embeddings; then train the result as usual",
    )
    train.set_defaults(func=cmd_train)
    with_model = ("--model DIR (--preset runs its own schedule)", lambda args: args.model is not None)
    distill = ("--distill", lambda args: args.distill)
    only_with(
        train,
        {
            "--scale": ("--preset", lambda args: args.preset is not None),
            "--steps": with_model,
            "--batch-size": with_model,
            "--lr": with_model,
            "--data": with_model,
            "--pool": ("--model DIR and --data shapes", lambda args: args.model is not None and args.data == "shapes"),
            "--consistency-max-t": ("--consistency-weight", lambda args: args.consistency_weight is not None),
            "--validation-images": ("--validate-every", lambda args: bool(args.validate_every)),
            "--validation-steps": ("--validate-every", lambda args: bool(args.validate_every)),
            "--distill-guidance": distill,
            "--distill-target": distill,
            "--teacher-steps": (
                "--distill and --distill-target endpoint or trajectory",
                lambda args: args.distill and args.distill_target in ("endpoint", "trajectory"),
            ),
            "--student": distill,
        },
    )

    restored = commands.add_parser(
        "from-checkpoint", help="a model folder from one of a 'featinv train' run's checkpoints"
    )
    restored.add_argument("--model", required=True, help="the model folder the run trained (its --model)")
    restored.add_argument("--checkpoint", required=True, help="OUT/checkpoints/step-NNNNNNN of that run")
    restored.add_argument("--out", required=True, help="the new model folder")
    restored.add_argument(
        "--raw", action="store_true", help="the trained weights, not their moving average (when the run had --ema)"
    )
    restored.set_defaults(func=cmd_from_checkpoint)

    classifier = commands.add_parser(
        "train-classifier", help="train a classifier on shapes or an image folder (then 'featinv create' for it)"
    )
    classifier.add_argument("--classifier", help="a timm model name (resnet18, vit_tiny_patch16_224), or see --source")
    add_source_args(classifier)
    classifier.add_argument(
        "--classifier-kwargs",
        help='JSON of constructor arguments, e.g. \'{"num_classes": 6, "layers": [1, 1, 1, 1]}\' (transformers: '
        "config fields, e.g. num_labels)",
    )
    classifier.add_argument("--classifier-weights", help="start from these weights (safetensors or .pth)")
    classifier.add_argument(
        "--input-size", type=arg("input_size"), help="classifier input side in pixels (default: the model's)"
    )
    classifier.add_argument("--data", default="shapes", help="shapes, or an ImageNet-layout folder")
    classifier.add_argument(
        "--image-size", type=arg("data_size"), default=32, help="the data's side in pixels (default 32)"
    )
    classifier.add_argument("--out", required=True, help="output folder (classifier.safetensors, classifier.json)")
    add_loop_args(classifier, steps=2000, batch_size=256, lr=3e-3)
    classifier.add_argument(
        "--held-out", type=arg("images"), default=1000, help="with --data shapes: held-out images for the accuracy"
    )
    classifier.set_defaults(func=cmd_train_classifier)
    shapes_data = ("--data shapes", lambda args: args.data == "shapes")
    only_with(classifier, {"--held-out": shapes_data, "--pool": shapes_data})

    features = commands.add_parser("features", help="feature-map utilities")
    features_commands = features.add_subparsers(dest="features_command", required=True, parser_class=Parser)
    cache = features_commands.add_parser("cache", help="compute a training pool's feature maps once")
    add_model_args(cache)
    cache.add_argument("--data", default="shapes", help="shapes, or an ImageNet-layout folder")
    cache.add_argument("--pool", type=arg("pool"), default=50_000, help="with --data shapes: images in the pool")
    cache.add_argument("--seed", type=arg("seed"), default=1, help="the pool's seed (as given to 'featinv train')")
    cache.add_argument("--out", required=True, help="output .safetensors file")
    cache.add_argument("--batch-size", type=arg("batch_size"), default=256)
    add_dtype_arg(cache, CACHE_DTYPES, "float32", "the stored maps' dtype", long=True)
    cache.add_argument("--device", default="auto")
    cache.set_defaults(func=cmd_features_cache, writes_file=True)
    only_with(cache, {"--pool": shapes_data})

    data = commands.add_parser("data", help="write datasets to disk")
    data_commands = data.add_subparsers(dest="data_command", required=True, parser_class=Parser)
    shapes = data_commands.add_parser("shapes", help="the procedural shapes dataset, ImageNet layout, with masks")
    shapes.add_argument("--out", required=True)
    shapes.add_argument("--n", type=arg("images"), default=1000)
    shapes.add_argument("--seed", type=arg("seed"), default=0)
    shapes.add_argument("--size", type=arg("data_size"), default=32)
    shapes.set_defaults(func=cmd_data_shapes)
