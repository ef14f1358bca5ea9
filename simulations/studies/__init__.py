"""Studies run after a simulated federation: the arms compared (compare, sweep, label efficiency,
head sharing), the downstream fine-tune-and-score they share, and their reports."""
