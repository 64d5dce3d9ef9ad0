"""langchain-core's chat-history tests, run against ConvstateChatMessageHistory."""
