-- wrk: a chat completion request as an OpenAI SDK sends it.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["api-key"] = "placeholder"
wrk.body = '{"messages":[{"role":"user","content":"Say hello in one word."}],"max_tokens":16,"temperature":0}'
