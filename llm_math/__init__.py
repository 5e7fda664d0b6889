"""llm_math: the mathematics of large language models, as code that measures it."""
