"""Stand-in for sd-scripts' library/train_util.py: argument helpers."""
import tomllib


def verify_command_line_training_args(args):
    pass


def read_config_from_file(args, parser):
    if not getattr(args, "config_file", None):
        return args
    with open(args.config_file, "rb") as f:
        for key, value in tomllib.load(f).items():
            setattr(args, key, value)
    return args
