"""NBN in RIDE: every BN of each expert's last stage, one scale per expert.

As in the authors' `resnet50_ride_NBN` (`scale_factor[e]` for the BN of
`layer4s.e`): bn1, bn2, bn3 of every block of `layer4s_{e}` and its shortcut
BN, fed by the scale `nbn_scale_expert{e}`, initialised to 1. Users ask for
it as `nbn_keras.convert_to_nbn(model, selection="ride")`.
"""

from nbn_keras.selection import StageGroupSelection

NAME = "ride"
SCALE_NAME = "nbn_scale_expert{}"

SELECTION = StageGroupSelection(
    # The BN layers of expert `e`'s last stage: `layer4s_{e}_...`.
    pattern=r"^layer4s_(\d+)_",
    scale_name=SCALE_NAME,
    name=NAME,
    refusal=(
        f"selection='{NAME}' takes only `separate_scales`: it converts "
        "every BN of each expert's last stage, one scale per expert."
    ),
    not_found=(
        f"The '{NAME}' selection needs a RIDE model (BN layers named "
        "'layer4s_<expert>_...'); '{model}' has none. Use "
        "selection='paper' for a plain ResNet."
    ),
    description="every BN of each expert's last stage, one scale per expert",
)


def scale_index(name):
    """Expert `e` for the scale layer `nbn_scale_expert{e}`, else `None`.

    Their checkpoints hold expert e's alpha as `scale_factor[e]`.
    """
    prefix = SCALE_NAME.format("")
    if name.startswith(prefix) and name[len(prefix):].isdigit():
        return int(name[len(prefix):])
    return None
