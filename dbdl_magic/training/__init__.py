"""Training runs: pack → iterate (one aggregate query each) → finish, with the policies
(early stopping, halving, selection, scaling) that shape a run.
"""
