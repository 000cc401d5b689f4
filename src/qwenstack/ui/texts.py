"""What the UI says, in Chinese and English; the browser's language picks one."""

from __future__ import annotations

TEXTS: dict[str, dict[str, str]] = {
    "welcome": {
        "zh": "欢迎使用 **{model}** 助手!请提出您的问题。对话会保存在左侧的历史记录中。",
        "en": "Welcome to the **{model}** assistant! Ask anything; your chats are kept in the "
              "history on the left.",
    },
    "no_model": {
        "zh": "网关目前没有可用的模型,请稍后再试。",
        "en": "The gateway serves no model right now; please try again later.",
    },
    "trimmed": {
        "zh": "对话已超出模型的上下文长度({context} 个 token),最早的 {turns} 轮对话未发送给模型。",
        "en": "This chat is longer than the model's context ({context} tokens): its {turns} "
              "oldest turn(s) were not sent to the model.",
    },
    "too_long": {
        "zh": "您的消息太长,超出了模型的上下文长度({context} 个 token),请缩短后重试。",
        "en": "Your message is too long for the model's context ({context} tokens); please "
              "shorten it.",
    },
    "gateway_down": {
        "zh": "无法连接到网关({url}),服务可能未启动。请稍后重试。",
        "en": "The gateway ({url}) cannot be reached; the service may be down. Please try again "
              "in a moment.",
    },
    "timeout": {
        "zh": "网关在 {seconds} 秒内没有响应,请稍后重试。",
        "en": "The gateway did not answer within {seconds} s; please try again.",
    },
    "engine_unavailable": {
        "zh": "模型正在启动或重启,请在约 {retry} 秒后重试。",
        "en": "The model is starting or restarting; please try again in about {retry} s.",
    },
    "rate_limited": {
        "zh": "您的请求过于频繁,已达到使用限制,请在约 {retry} 秒后重试。",
        "en": "You have reached your usage limit; please try again in about {retry} s.",
    },
    "model_not_allowed": {
        "zh": "您的账户无权使用模型 {model},请在设置中选择其他模型。",
        "en": "Your account may not use the model {model}; choose another one in the settings.",
    },
    "key_rejected": {
        "zh": "网关拒绝了您的访问密钥,请联系管理员。",
        "en": "The gateway refused your access key; please ask an administrator.",
    },
    "no_key": {
        "zh": "无法为您的账户获取网关访问密钥:{reason}",
        "en": "No gateway key could be made for your account: {reason}",
    },
    "gateway_error": {
        "zh": "网关返回错误({status}):{message}",
        "en": "The gateway answered with an error ({status}): {message}",
    },
    "upload_refused": {
        "zh": "文件未能加入您的文档库({status}):{message}",
        "en": "Your files could not be added to your documents ({status}): {message}",
    },
    "file_ingested": {
        "zh": "**{file}** 已加入您的文档库({chunks} 个片段),回答将引用您的文档。",
        "en": "**{file}** was added to your documents ({chunks} chunk(s)); answers will draw on "
              "your documents.",
    },
    "file_replaced": {
        "zh": "**{file}** 已在您的文档库中更新({chunks} 个片段)。",
        "en": "**{file}** was updated in your documents ({chunks} chunk(s)).",
    },
    "file_unchanged": {
        "zh": "**{file}** 未改变,已在您的文档库中,已跳过。",
        "en": "**{file}** is unchanged and already in your documents: skipped.",
    },
    "sources": {
        "zh": "来源:\n\n{sources}",
        "en": "Sources:\n\n{sources}",
    },
    "no_answer": {
        "zh": "模型没有给出回答(可能在思考时就用完了最大回答长度,可在设置中调高)。",
        "en": "The model gave no answer (it may have used up the max answer tokens while "
              "thinking; raise them in the settings).",
    },
    "usage": {
        "zh": "*Token:提示 {prompt},回答 {completion}。{quota}*",
        "en": "*Tokens: {prompt} prompt, {completion} completion. {quota}*",
    },
    "quota_left": {
        "zh": "您的密钥本分钟还可用 {left}。", "en": "Your key has {left} left this minute.",
    },
    "quota_requests": {"zh": "{left}/{limit} 次请求", "en": "{left} of {limit} requests"},
    "quota_tokens": {"zh": "{left}/{limit} 个 token", "en": "{left} of {limit} tokens"},
    "quota_and": {"zh": "和 ", "en": " and "},
    "quota_unlimited": {"zh": "您的密钥没有速率限制。", "en": "Your key has no rate limits."},
    "thinking": {"zh": "思考", "en": "Thinking"},
    "setting_thinking": {
        "zh": "深度思考(先推理再回答)", "en": "Thinking (reason before answering)",
    },
    "setting_model": {"zh": "模型", "en": "Model"},
    "setting_system_prompt": {"zh": "系统提示词", "en": "System prompt"},
    "setting_temperature": {"zh": "温度 (temperature)", "en": "Temperature"},
    "setting_top_p": {"zh": "Top P", "en": "Top P"},
    "setting_max_tokens": {"zh": "最大回答长度 (token)", "en": "Max answer tokens"},
    "setting_use_documents": {
        "zh": "根据文档库回答", "en": "Answer from documents",
    },
    "setting_knowledge_base": {"zh": "文档库", "en": "Documents"},
    "own_documents": {"zh": "我上传的文档", "en": "My uploads"},
    "documents_chosen": {
        "zh": "回答将根据文档库 **{base}**。", "en": "Answers now draw on **{base}**.",
    },
    "files_button": {"zh": "文件", "en": "Files"},
    "files": {"zh": "**{base}** 中的文件({count} 个):", "en": "Files in **{base}** ({count}):"},
    "no_files": {"zh": "**{base}** 中还没有文件。", "en": "**{base}** holds no files yet."},
    "delete_button": {"zh": "删除 {file}", "en": "Delete {file}"},
    "file_deleted": {"zh": "已从 **{base}** 删除:", "en": "Deleted from **{base}**:"},
    "passage": {"zh": "段落 {number}", "en": "Passage {number}"},
    "passage_page": {"zh": ",第 {page} 页", "en": ", p. {page}"},
    "passages": {"zh": "原文:{passages}", "en": "Passages: {passages}"},
}

STARTERS: dict[str, list[tuple[str, str]]] = {
    "zh": [
        ("量子纠缠", "请解释什么是量子纠缠,并举例说明其在通信中的应用。"),
        ("写一封邮件", "帮我写一封简短的邮件,邀请同事参加下周三下午的项目评审会。"),
        ("Python 代码", "用 Python 写一个函数,判断一个字符串是否是回文,并附上几个测试用例。"),
        ("对比表格", "用 Markdown 表格对比 TCP 和 UDP 的主要区别。"),
    ],
    "en": [
        ("Quantum entanglement", (
            "Explain quantum entanglement and give an example of its use in communication.")),
        ("Write an email", (
            "Write a short email inviting colleagues to a project review next Wednesday "
            "afternoon.")),
        ("Python code", (
            "Write a Python function that checks whether a string is a palindrome, with a few "
            "test cases.")),
        ("Comparison table", "Compare TCP and UDP in a Markdown table."),
    ],
}


def language_of(browser_language: str | None) -> str:
    """`zh` for any Chinese browser language (zh-CN, zh-TW, ...), else `en`."""
    return "zh" if (browser_language or "").lower().startswith("zh") else "en"


def text(key: str, language: str, **values: object) -> str:
    return TEXTS[key][language].format(**values)


def starters(language: str) -> list[tuple[str, str]]:
    """(label, message) pairs."""
    return STARTERS[language]
