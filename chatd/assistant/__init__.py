"""The assistant: providers, prompt context, retrieval, and answers streamed into rooms."""
