"""The console scripts, one module each: `finetune` (train), `finetune-compare`, `finetune-evaluate`,
`finetune-export`, `finetune-audit`. Each builds through `finetune.build`; none imports another."""
