"""Routers: pick each layer's sub-network for a budget or latency target (docs/design.md, "Routers").

The latency they target is flextron.latency's (shapes, tables, profiling).

base          Router: choices, budget encoder, sessions, initialisation to configurations
static        StaticRouter: one configuration per budget
dynamic       DynamicRouter: per-token MLP widths, per-sequence head counts
sequence      SequenceRouter: per sequence, one of the configurations the model is good at
sequence_fitting  fitting it on the model's per-sequence losses
sampling      Sampling, the straight-through pick, the RoutingSession protocol
sessions      routing sessions, the model's `session=`
objectives    latency expectation and loss, task losses
files         routers.safetensors / routers.json
config        RouterTrainingConfig: every train-router setting
training      surrogate-model loop, end-to-end and joint fine-tuning
calibration   a dynamic router's latency calibration
initial       training-only starting configurations
selection     inference: a budget or latency target -> the sub-network (BudgetResolver)
evaluation    perplexity of selections
pipeline      train_routers: what `flextron train-router` runs

Layer 4: may import flextron.latency, flextron.eval, flextron.model and the layers below them.
"""

from flextron.routers.base import BudgetEncoder, Router, default_head_choices, default_mlp_choices
from flextron.routers.calibration import (
    calibrate_dynamic,
    calibrate_dynamic_measured,
    calibration_grid,
    measure_routing_overhead,
)
from flextron.routers.config import RouterTrainingConfig
from flextron.routers.dynamic import DynamicRouter
from flextron.routers.evaluation import dynamic_perplexity, evaluate_selections
from flextron.routers.files import ROUTER_KINDS, ROUTERS_FILE, ROUTERS_META_FILE, load_routers, save_routers
from flextron.routers.initial import static_init_archs, uniform_init_archs
from flextron.routers.objectives import LatencyTarget, expected_latency, latency_loss
from flextron.routers.pipeline import train_routers
from flextron.routers.sampling import INFERENCE, RoutingSession, Sampling
from flextron.routers.selection import (
    METHODS,
    BudgetResolver,
    Selection,
    fit_to_latency,
    reference_shape,
    uniform_arch_for_latency,
)
from flextron.routers.sequence import SequenceRouter
from flextron.routers.sessions import DynamicSession, StaticSession
from flextron.routers.static import StaticRouter
from flextron.routers.training import (
    SurrogateModel,
    TemperatureSchedule,
    TrainingLog,
    train_end_to_end,
    train_router_surrogate,
)

__all__ = [
    "INFERENCE",
    "METHODS",
    "ROUTERS_FILE",
    "ROUTERS_META_FILE",
    "ROUTER_KINDS",
    "BudgetEncoder",
    "BudgetResolver",
    "DynamicRouter",
    "DynamicSession",
    "LatencyTarget",
    "Router",
    "RouterTrainingConfig",
    "RoutingSession",
    "Sampling",
    "Selection",
    "SequenceRouter",
    "StaticRouter",
    "StaticSession",
    "SurrogateModel",
    "TemperatureSchedule",
    "TrainingLog",
    "calibrate_dynamic",
    "calibrate_dynamic_measured",
    "calibration_grid",
    "default_head_choices",
    "default_mlp_choices",
    "dynamic_perplexity",
    "evaluate_selections",
    "expected_latency",
    "fit_to_latency",
    "latency_loss",
    "load_routers",
    "measure_routing_overhead",
    "reference_shape",
    "save_routers",
    "static_init_archs",
    "train_end_to_end",
    "train_router_surrogate",
    "train_routers",
    "uniform_arch_for_latency",
    "uniform_init_archs",
]
