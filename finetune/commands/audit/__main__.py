"""`python -m finetune.commands.audit`: the `finetune-audit` command."""

from finetune.commands.audit import main

main()
