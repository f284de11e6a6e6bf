"""Calibration after training: train.py's flags that fit the saved model's softmax on the held-out
split."""

from dataclasses import dataclass, field


@dataclass
class CalibrationArguments:
    _argument_group_name = "calibration after training"  # its title in --help (HfArgumentParser)

    calibrate_temperature: bool = field(
        default=False,
        metadata={
            "help": "After training, fit one softmax temperature on the held-out split and fold it "
            "into the final LayerNorm of the saved model. GPT-2 models only. Default: off."
        },
    )
    calibrate_token_offsets: bool = field(
        default=False,
        metadata={
            "help": "After training (and --calibrate_temperature), fit a logit scale, offset and "
            "slope on log(1 + token id) per class of training count on the held-out split, "
            "folded into the final LayerNorm and an untied LM head. GPT-2 models only. "
            "Default: off."
        },
    )
