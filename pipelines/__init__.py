"""Pure image / ML code for Defect Studio (generators, masks, colour, training, evaluation).

Never imports gradio or ``studio``: everything here is usable from tests, the CLI and notebooks.
"""
