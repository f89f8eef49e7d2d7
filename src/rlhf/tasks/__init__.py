"""Built-in tasks with a programmatic gold preference (data files of every kind, gold reward functions) and the
tiny local models and tokenizers the demo and the tests train."""
