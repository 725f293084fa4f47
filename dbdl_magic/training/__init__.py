"""Training runs: pack → iterate (one aggregate query each) → finish, with hooks between.

``run``        :class:`~dbdl_magic.training.run.TrainingRun`, the loop: pack, then each
               iteration (query, evaluate, checkpoint, commit), then finish
``hooks``      the hook protocol and the hooks every run has: history, early stopping,
               successive halving, member statuses, return-on-interrupt
``monitor``    the hook that forwards to the monitors' :class:`~dbdl_magic.events.Callbacks`
``prepare``    what a run trains on: model specs, the warm-start source, the packed rows
``members``    the models a run trains side by side: plan, kernel config, versions
``resume``     continuing an interrupted run: checks, claiming, replaying decisions
``planning``   each iteration's queries, workers and threads (cost model: ``scaling``)
``history``    the run's history rows (what monitors show and the store keeps)
``cohort``     how a run ends in the store: best trial copy, per-group router, leaderboard
``failures``   database errors translated, runs marked failed/interrupted, cleanup
``policies``   the rules: early stopping, halving survivors, warm-start encoding/freezing
``selection``  grid / random search trials, halving rungs, ranking
"""
