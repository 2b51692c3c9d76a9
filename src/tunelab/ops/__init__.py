"""Pure tensor functions that tasks and training share (layer 3: below methods and tasks): the chunked LM loss,
sequence packing, the preference losses and the task metrics."""
