"""ComfyUI layer of AnyDressing: node classes and the glue to ModelPatcher. Imported only inside ComfyUI."""
