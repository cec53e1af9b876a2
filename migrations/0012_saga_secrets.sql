-- What a saga's steps need and nobody may see (a checkout's payment token): kept apart from the
-- saga's snapshot, event log and messages, read only by the service whose step needs it (the
-- payment service, by saga id), written by the commit that starts the saga and deleted by the
-- one that ends it.
CREATE TABLE orchestrator.saga_secrets (
    saga_id uuid NOT NULL,
    name    text NOT NULL,
    value   text NOT NULL,
    PRIMARY KEY (saga_id, name)
);

-- Before this migration a checkout kept its payment token in its snapshot, its start input and
-- the charge command of its event log. The token of a saga still running moves into the
-- secrets; every stored copy is replaced by its hint (sagas::checkout::token_hint: the first
-- and last four characters of a token longer than 12, else the last two).
INSERT INTO orchestrator.saga_secrets (saga_id, name, value)
SELECT id, 'payment_token', snapshot -> 'data' ->> 'payment_token'
  FROM orchestrator.sagas
 WHERE saga_type = 'checkout'
   AND status NOT IN ('completed', 'compensated', 'failed')
   AND snapshot -> 'data' ->> 'payment_token' IS NOT NULL;

UPDATE orchestrator.sagas
   SET snapshot = jsonb_set(
           snapshot::jsonb #- '{data,payment_token}',
           '{data,payment_token_hint}',
           to_jsonb(CASE WHEN char_length(snapshot -> 'data' ->> 'payment_token') > 12
                         THEN left(snapshot -> 'data' ->> 'payment_token', 4) || '…'
                              || right(snapshot -> 'data' ->> 'payment_token', 4)
                         ELSE '…' || right(snapshot -> 'data' ->> 'payment_token', 2) END))::json
 WHERE saga_type = 'checkout' AND snapshot -> 'data' ->> 'payment_token' IS NOT NULL;

UPDATE orchestrator.saga_events
   SET input = (input::jsonb - 'payment_token'
                || jsonb_build_object('payment_token_hint',
                       CASE WHEN char_length(input ->> 'payment_token') > 12
                            THEN left(input ->> 'payment_token', 4) || '…' || right(input ->> 'payment_token', 4)
                            ELSE '…' || right(input ->> 'payment_token', 2) END))::json
 WHERE kind = 'started' AND input ->> 'payment_token' IS NOT NULL;

UPDATE orchestrator.saga_events
   SET effects = (SELECT coalesce(json_agg(e.effect::jsonb - 'payment_token' ORDER BY e.n), '[]'::json)
                    FROM json_array_elements(effects) WITH ORDINALITY AS e(effect, n))
 WHERE effects::text LIKE '%"payment_token"%';
