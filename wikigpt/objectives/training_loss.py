"""Replace a GPT2LMHeadModel's training loss, and only that: the shared wrap of --chunked_loss_size
and --rare_tokens_below.

Only the training forward with labels changes (model.training and labels given): it runs the
transformer, hands its final hidden states to the new loss, and returns that loss with
`logits=None`, which the Trainer's training step does not read. Evaluation, generation and anything
else go through the unchanged GPT2LMHeadModel.forward. The wrap is on the instance's `forward` (no
new class, no new weights), so checkpoints stay plain GPT2LMHeadModel folders.
"""

from types import MethodType

from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

# What the Trainer and transformers' ForCausalLMLoss pass on to the loss.
LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")


def replace_training_loss(model, loss, input_ids_map=None):
    """Train `model` on `loss(model, hidden_states, labels, **loss_kwargs)`.

    `input_ids_map(model, input_ids)`: the ids the transformer reads instead of the batch's (a batch
    without input_ids then takes the plain forward). Both are kept on the model, so a deep copy
    (weight averaging) carries them along.
    """
    model._training_loss, model._training_input_ids_map = loss, input_ids_map
    model.forward = MethodType(
        _training_forward, model
    )  # a bound method, as accelerate's wrappers expect
    return model


def _training_forward(
    self,
    input_ids=None,
    past_key_values=None,
    attention_mask=None,
    token_type_ids=None,
    position_ids=None,
    inputs_embeds=None,
    encoder_hidden_states=None,
    encoder_attention_mask=None,
    labels=None,
    use_cache=None,
    logits_to_keep=0,
    **kwargs,
):
    """GPT2LMHeadModel.forward's signature (the Trainer reads it: input columns, **kwargs for
    num_items_in_batch)."""
    args = dict(
        past_key_values=past_key_values,
        attention_mask=attention_mask,
        token_type_ids=token_type_ids,
        position_ids=position_ids,
        inputs_embeds=inputs_embeds,
        encoder_hidden_states=encoder_hidden_states,
        encoder_attention_mask=encoder_attention_mask,
        use_cache=use_cache,
    )
    input_ids_map = self._training_input_ids_map
    if (
        not (self.training and labels is not None)
        or logits_to_keep
        or kwargs.get("return_dict") is False
        or (input_ids_map is not None and input_ids is None)
    ):
        return type(self).forward(
            self,
            input_ids=input_ids,
            **args,
            labels=labels,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
    teacher = getattr(
        self, "_teacher", None
    )  # --distill_from (wikigpt.objectives.distillation): reads the real ids
    if teacher is not None:
        teacher.read(input_ids, attention_mask)
    if input_ids_map is not None:
        input_ids = input_ids_map(self, input_ids)
    # As GPT2LMHeadModel.forward, with the LM head and loss replaced.
    outputs = self.transformer(input_ids=input_ids, **args, **kwargs)
    loss_kwargs = {k: kwargs[k] for k in LOSS_KWARGS if k in kwargs}
    if teacher is not None:
        loss_kwargs["teacher"] = teacher
    loss = self._training_loss(self, outputs.last_hidden_state, labels, **loss_kwargs)
    return CausalLMOutputWithCrossAttentions(
        loss=loss,
        logits=None,
        past_key_values=outputs.past_key_values,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
        cross_attentions=outputs.cross_attentions,
    )
