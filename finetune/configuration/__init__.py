"""Configuration: the rule vocabulary components state their settings in (`rules`), the check of a
composed config against every component's rules (`checks`), and the defaults registered with Hydra (`store`)."""
