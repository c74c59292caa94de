"""Sans-io wire formats: SSE framing and the OpenAI chat-completions shapes.

Nothing here does I/O or imports trio, httpx or quart; functions take values and bytes and return
values, which is what makes them property-testable.
"""
