# Define a custom TurboGenTemplateFn
async def custom_turbo_gen_template(memory: Optional[BaseMemory] = None, **context) -> TurboGenTemplate:
    # Generate messages based on the given context and memory
    ...

# Create a TurboGenFn instance with the custom template function
turbo_gen_fn = TurboGenFn(fn=custom_turbo_gen_template, settings={})

# Configure the generator with new settings
new_settings = {"setting1": "value1", "setting2": "value2"}
turbo_gen_fn = turbo_gen_fn.configure(new_settings)

# Generate messages using the generator
turbo_gen_wrapper = turbo_gen_fn(**context)
