"""Analysis of teachers: mutual information (``mi``), information plane (``information``), MLP expertness,
pruning, layer dynamics, sharpness, and their plots (docs/analysis.md).

Example:
    >>> import timm, torch
    >>> from timm_remem.analysis import layer_dynamics
    >>> model = timm.create_model("test_vit", pretrained=False, img_size=32)
    >>> layer_dynamics(model, torch.randn(2, 3, 32, 32)).entropy.shape
    torch.Size([6])
"""

from .dynamics import (
    LayerDynamics,
    activation_magnitude,
    channel_spectrum,
    frequency_intensity,
    layer_dynamics,
    token_entropy,
)
from .expertness import BlockExpertness, mlp_expertness, neuron_statistics
from .information import (
    CheckpointScore,
    TeacherInformation,
    information_from_features,
    information_plane,
    rank_checkpoints,
    teacher_information,
)
from .mi import MI_METHODS, MutualInformation, estimate_mi
from .plots import (
    plot_demo,
    plot_expertness,
    plot_information_plane,
    plot_layer_dynamics,
    plot_pruning,
    plot_select,
)
from .pruning import PruningResult, pruning_diagnostic, zero_branches
from .sharpness import (
    SAMSharpness,
    Sharpness,
    TopEigenvalue,
    hessian_top_eigenvalue,
    measure_sharpness,
    sam_sharpness,
)

__all__ = [
    "MI_METHODS",
    "estimate_mi",
    "MutualInformation",
    "TeacherInformation",
    "CheckpointScore",
    "teacher_information",
    "information_from_features",
    "information_plane",
    "rank_checkpoints",
    "BlockExpertness",
    "mlp_expertness",
    "neuron_statistics",
    "PruningResult",
    "pruning_diagnostic",
    "zero_branches",
    "LayerDynamics",
    "layer_dynamics",
    "channel_spectrum",
    "frequency_intensity",
    "token_entropy",
    "activation_magnitude",
    "Sharpness",
    "SAMSharpness",
    "TopEigenvalue",
    "measure_sharpness",
    "sam_sharpness",
    "hessian_top_eigenvalue",
    "plot_information_plane",
    "plot_layer_dynamics",
    "plot_pruning",
    "plot_expertness",
    "plot_select",
    "plot_demo",
]
