"""vlmtune: fine-tune and evaluate vision-language models from one YAML file.

Data flows one way: config -> data -> models -> train -> eval -> experiment (report).
"""

__version__ = "0.1.0"
