"""Control prompts for language models: GCG, greedy back-generation, reachability, messages.

Depends on torch and transformers only (never on the bus or the round engine).
"""

from controllers.filters import allowed_token_mask, filter_candidates, retokenizes
from controllers.gcg import GCG, GCGConfig, GCGResult, one_hot_gradient, run_gcg, sample_candidates
from controllers.messages import (
    MessagePart,
    MessageSearchConfig,
    MessageSearchResult,
    MessageTask,
    message_gradients,
    message_losses,
    search_messages,
)
from controllers.objectives import (
    ControllerError,
    MeanObjective,
    Objective,
    Scores,
    SequenceObjective,
    input_embedding,
    score_batched,
    stream_objective,
    target_objective,
)
from controllers.reach import (
    GameResult,
    ReachConfig,
    ReachPair,
    ReachResult,
    ReachRow,
    ReachSummary,
    draw_pairs,
    format_summary,
    play_game,
    run_reach,
    summarize,
)
from controllers.search import (
    BackoffConfig,
    BackoffResult,
    GreedyConfig,
    GreedyResult,
    backoff_search,
    greedy_backgenerate,
)

__all__ = [
    "GCG",
    "BackoffConfig",
    "BackoffResult",
    "ControllerError",
    "GCGConfig",
    "GCGResult",
    "GameResult",
    "GreedyConfig",
    "GreedyResult",
    "MeanObjective",
    "MessagePart",
    "MessageSearchConfig",
    "MessageSearchResult",
    "MessageTask",
    "Objective",
    "ReachConfig",
    "ReachPair",
    "ReachResult",
    "ReachRow",
    "ReachSummary",
    "Scores",
    "SequenceObjective",
    "allowed_token_mask",
    "backoff_search",
    "draw_pairs",
    "filter_candidates",
    "format_summary",
    "greedy_backgenerate",
    "input_embedding",
    "message_gradients",
    "message_losses",
    "one_hot_gradient",
    "play_game",
    "retokenizes",
    "run_gcg",
    "run_reach",
    "sample_candidates",
    "score_batched",
    "search_messages",
    "stream_objective",
    "summarize",
    "target_objective",
]
